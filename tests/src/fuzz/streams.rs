//! The `server_streams` harness: a real client (quiche, real TLS) completes
//! its handshake with a fresh server, then the input says what it does on
//! its streams, hostile or not. This reaches what `server_datagram` cannot
//! get to through the encryption: the server's stream plumbing (splitting,
//! answers in order, duplicates, held reports, size and load limits, resets,
//! STOP_SENDING, HTTP/0.9).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use quic_report_core::config::{ALPN, HQ_ALPN};
use quic_report_core::stream::{Item, ObjectSplitter};
use quic_report_core::{CoreRng, Outcome, Report, ServerConfig};
use serde_json::{Map, Value};

use super::{ADVANCE_MS, Harness, PEERS, addr, server_seed};
use crate::{RawPeer, cert_path};

/// `flags` bit: the client speaks HTTP/0.9 (`hq-interop`), not reports.
pub const FLAG_HQ: u8 = 1;
/// `flags` bit: small limits (64-byte reports, 128 unanswered bytes, 4
/// streams), so the fuzzer reaches them.
pub const FLAG_SMALL: u8 = 2;
/// `flags` bit: reports are held until an [`Op::Answer`] (or the end).
pub const FLAG_HOLD: u8 = 4;
/// `flags` bit: reports are answered [`Outcome::NotRecorded`].
pub const FLAG_NOT_RECORDED: u8 = 8;

/// One thing the client does. Streams are client bidirectional stream
/// number `stream % 16` (ID `4 * (stream % 16)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    /// Writes `data` (at most 255 bytes), then FIN if `fin`.
    Write {
        /// The stream.
        stream: u8,
        /// The bytes.
        data: &'a [u8],
        /// FIN after them.
        fin: bool,
    },
    /// Writes a well-formed report `{"client":"c<client>","seq":<seq>,"s":<stream>}`.
    Report {
        /// The stream.
        stream: u8,
        /// Its client, 0..8.
        client: u8,
        /// Its seq.
        seq: u8,
        /// FIN after it.
        fin: bool,
    },
    /// Resets the stream (RESET_STREAM).
    Reset(u8),
    /// Stops reading the stream (STOP_SENDING).
    Stop(u8),
    /// Virtual time passes ([`ADVANCE_MS`] index, 0..8); timers run.
    Time(u8),
    /// The client stops (or resumes) reading what the server sends.
    Pause,
    /// The application answers every report it holds.
    Answer {
        /// As not recorded (else recorded).
        not_recorded: bool,
    },
    /// The client closes the connection.
    Close,
}

/// Encodes a `server_streams` input:
///
/// ```text
/// input = flags:u8 op*
/// op    = 0|fin<<3 stream:u8 len:u8 data[len]    Write
///       | 1|fin<<3|client<<4 stream:u8 seq:u8    Report
///       | 2 stream:u8 | 3 stream:u8              Reset | Stop
///       | 4|advance<<3 | 5 | 6|not_recorded<<3 | 7   Time | Pause | Answer | Close
/// ```
///
/// Unused bits are ignored; a truncated last op is dropped.
pub fn encode_ops(flags: u8, ops: &[Op<'_>], out: &mut Vec<u8>) {
    out.push(flags);
    for op in ops {
        match *op {
            Op::Write { stream, data, fin } => {
                out.extend_from_slice(&[u8::from(fin) << 3, stream]);
                out.push(u8::try_from(data.len()).expect("at most 255 bytes per write"));
                out.extend_from_slice(data);
            }
            Op::Report {
                stream,
                client,
                seq,
                fin,
            } => out.extend_from_slice(&[1 | u8::from(fin) << 3 | (client & 7) << 4, stream, seq]),
            Op::Reset(s) => out.extend_from_slice(&[2, s]),
            Op::Stop(s) => out.extend_from_slice(&[3, s]),
            Op::Time(a) => out.push(4 | (a & 7) << 3),
            Op::Pause => out.push(5),
            Op::Answer { not_recorded } => out.push(6 | u8::from(not_recorded) << 3),
            Op::Close => out.push(7),
        }
    }
}

/// Decodes the ops of a `server_streams` input (after its flags byte).
pub fn decode_ops(mut rest: &[u8]) -> Vec<Op<'_>> {
    let mut ops = Vec::new();
    while let Some((&code, tail)) = rest.split_first() {
        let fin = code & 8 != 0;
        let (op, tail) = match (code & 7, tail) {
            (0, [stream, len, tail @ ..]) => {
                let n = usize::from(*len).min(tail.len());
                let (data, tail) = tail.split_at(n);
                let op = Op::Write {
                    stream: *stream,
                    data,
                    fin,
                };
                (op, tail)
            }
            (1, [stream, seq, tail @ ..]) => {
                let op = Op::Report {
                    stream: *stream,
                    client: code >> 4 & 7,
                    seq: *seq,
                    fin,
                };
                (op, tail)
            }
            (2, [s, tail @ ..]) => (Op::Reset(*s), tail),
            (3, [s, tail @ ..]) => (Op::Stop(*s), tail),
            (4, _) => (Op::Time(code >> 3 & 7), tail),
            (5, _) => (Op::Pause, tail),
            (6, _) => (Op::Answer { not_recorded: fin }, tail),
            (7, _) => (Op::Close, tail),
            _ => break,
        };
        ops.push(op);
        rest = tail;
    }
    ops
}

/// What the client did on one stream.
#[derive(Debug, Default)]
struct Sent {
    /// Bytes quiche accepted, in order.
    data: Vec<u8>,
    /// quiche accepted the FIN.
    fin: bool,
    /// A FIN is queued (nothing more is written).
    fin_queued: bool,
    /// The client reset it.
    reset: bool,
    /// The client stopped reading it.
    stopped: bool,
    /// The server stopped reading it (STOP_SENDING).
    stopped_by_server: bool,
}

/// The client: a raw quiche connection and what it wrote.
struct Peer {
    raw: RawPeer,
    /// Writes quiche has not taken yet, per stream, in order.
    pending: BTreeMap<u64, VecDeque<(Vec<u8>, bool)>>,
    sent: BTreeMap<u64, Sent>,
    /// For reading streams.
    buf: Vec<u8>,
    /// For the datagrams it sends.
    out: Vec<u8>,
}

impl Peer {
    fn queue(&mut self, sid: u64, data: &[u8], fin: bool) {
        let st = self.sent.entry(sid).or_default();
        if st.fin_queued || st.reset || st.stopped_by_server || (data.is_empty() && !fin) {
            return;
        }
        st.fin_queued = fin;
        self.pending
            .entry(sid)
            .or_default()
            .push_back((data.to_vec(), fin));
    }

    /// Hands quiche what it takes of the pending writes.
    fn pump(&mut self) {
        for (&sid, q) in &mut self.pending {
            let st = self.sent.entry(sid).or_default();
            while let Some((data, fin)) = q.front_mut() {
                match self.raw.conn.stream_send(sid, data, *fin) {
                    Ok(n) => {
                        st.data.extend_from_slice(&data[..n]);
                        if n < data.len() {
                            data.drain(..n);
                            break;
                        }
                        st.fin |= *fin;
                        q.pop_front();
                    }
                    Err(quiche::Error::Done | quiche::Error::StreamLimit) => break,
                    Err(quiche::Error::StreamStopped(_)) => {
                        st.stopped_by_server = true;
                        q.clear();
                    }
                    Err(_) => q.clear(),
                }
            }
        }
    }

    /// Reads what the server sent on every readable stream (unless the
    /// client pauses reading).
    fn read(&mut self) {
        if self.raw.read_paused {
            return;
        }
        let readable: Vec<u64> = self.raw.conn.readable().collect();
        for sid in readable {
            while let Ok((n, fin)) = self.raw.conn.stream_recv(sid, &mut self.buf) {
                let s = self.raw.streams.entry(sid).or_default();
                s.data.extend_from_slice(&self.buf[..n]);
                s.fin |= fin;
            }
        }
    }

    fn alive(&self) -> bool {
        let c = &self.raw.conn;
        c.is_established()
            && !c.is_closed()
            && !c.is_draining()
            && c.peer_error().is_none()
            && c.local_error().is_none()
    }
}

/// Moves datagrams both ways (no loss, no delay) until neither side has
/// anything to send.
fn exchange(h: &mut Harness, p: &mut Peer) {
    for _ in 0..10_000 {
        p.pump();
        let mut moved = false;
        while let Some((len, to)) = p.raw.poll_transmit(&mut p.out) {
            moved = true;
            assert_eq!(to, h.server_addr, "the client sends to the server");
            h.datagram(p.raw.addr, &p.out[..len]);
        }
        let out = h.outbox.as_mut().map(std::mem::take).unwrap_or_default();
        for (mut d, to) in out {
            moved = true;
            assert_eq!(to, p.raw.addr, "the server answers the client");
            p.raw.receive(h.server_addr, &mut d);
        }
        p.read();
        if !moved {
            return;
        }
    }
    panic!("client and server never stop sending");
}

/// Runs the client's and the server's due timers.
fn timers(h: &mut Harness, p: &mut Peer) {
    h.timers();
    let now = h.clock.now();
    if p.raw.poll_timeout().is_some_and(|t| t <= now) {
        p.raw.handle_timeout();
    }
}

/// What the server must answer on a stream that carried `data` (then FIN
/// if `fin`): one item per object, up to the first fatal error.
fn expected(limit: usize, data: &[u8], fin: bool) -> Vec<Item> {
    let mut s = ObjectSplitter::new(limit);
    s.push(data);
    if fin {
        s.finish();
    }
    std::iter::from_fn(|| s.next_item()).collect()
}

/// Checks one answer line against the item it answers.
fn check_answer(sid: u64, i: usize, line: &[u8], item: &Item) {
    let text = String::from_utf8_lossy(line);
    let v: Map<String, Value> = serde_json::from_slice(line)
        .unwrap_or_else(|e| panic!("stream {sid} answer {i} is not a JSON object ({e}): {text}"));
    let ok = v.get("ok").and_then(Value::as_bool);
    let code = v.get("code").and_then(Value::as_str);
    let want_code = match item {
        // The fuzzed server is anonymous: a report is bound to "".
        Ok(object) => match Report::from_json_object(object.clone())
            .and_then(|r| r.bind_identity(&quic_report_core::Identity::anonymous()))
        {
            Ok(bound) => {
                if ok == Some(true) {
                    assert_eq!(
                        v.get("received"),
                        Some(&Value::Object(bound.fields())),
                        "stream {sid} answer {i} echoes the report with its identity: {text}"
                    );
                    return;
                }
                "not_recorded"
            }
            Err(e) => e.code(),
        },
        Err(e) => e.code(),
    };
    assert!(
        ok == Some(false) && code == Some(want_code),
        "stream {sid} answer {i}: want ok:false code {want_code}, got {text} for {item:?}"
    );
}

/// Checks what came back on every stream against what the client wrote;
/// returns how many answers were checked.
fn check_streams(h: &Harness, p: &Peer, limit: usize, hq: bool) -> usize {
    let alive = p.alive() && h.server.connections() == 1;
    let mut checked = 0;
    for (&sid, st) in &p.sent {
        if st.reset || st.stopped {
            continue;
        }
        let seen = p.raw.seen(sid);
        if hq {
            if alive && st.fin {
                assert!(
                    seen.fin && !seen.data.is_empty(),
                    "HTTP/0.9 stream {sid}: a request with FIN gets an answer and FIN"
                );
                checked += 1;
            }
            continue;
        }
        let want = expected(limit, &st.data, st.fin);
        let mut lines: Vec<&[u8]> = seen.data.split(|&b| b == b'\n').collect();
        let partial = lines.pop().unwrap_or_default();
        assert!(
            lines.len() <= want.len(),
            "stream {sid}: {} answers for {} objects",
            lines.len(),
            want.len()
        );
        for (i, (line, item)) in lines.iter().zip(&want).enumerate() {
            check_answer(sid, i, line, item);
            checked += 1;
        }
        if !alive {
            continue;
        }
        // A live connection has answered everything it was sent, and ends
        // its side once the client's ended or an error ended the stream.
        assert!(
            partial.is_empty() && lines.len() == want.len(),
            "stream {sid}: {} answers (and {} bytes of a partial one) for {} objects",
            lines.len(),
            partial.len(),
            want.len()
        );
        let fatal = want
            .last()
            .is_some_and(|i| i.as_ref().is_err_and(|e| e.is_fatal()));
        assert_eq!(
            seen.fin,
            st.fin || fatal,
            "stream {sid}: server FIN (client FIN {}, fatal error {fatal})",
            st.fin
        );
    }
    checked
}

/// The `server_streams` fuzz target: a client completes its handshake with
/// a fresh server, then does what `input` says (see [`encode_ops`];
/// `flags` are [`FLAG_HQ`], [`FLAG_SMALL`], [`FLAG_HOLD`],
/// [`FLAG_NOT_RECORDED`]). Then every held report is answered, and the
/// client reads everything. Panics if, besides what `server_datagram`
/// checks on every datagram and at shutdown:
///
/// - an answer on a report stream is not a JSON object line, or does not
///   match the object it answers (in order): a report is echoed with
///   `"ok":true` or refused `not_recorded`, anything else refused with the
///   code of its error;
/// - on a live connection, a stream does not get exactly one answer per
///   object (up to the first fatal error), or the server ends its side
///   when it should not, or does not when it should (the client's FIN or a
///   fatal error);
/// - an HTTP/0.9 request with FIN gets no answer and FIN.
///
/// Returns how many answers were checked.
pub fn server_streams(input: &[u8]) -> usize {
    let Some((&flags, rest)) = input.split_first() else {
        return 0;
    };
    let hq = flags & FLAG_HQ != 0;
    let mut cfg = ServerConfig::new(cert_path("localhost.pem"), cert_path("localhost.key"));
    if flags & FLAG_SMALL != 0 {
        cfg.max_report_bytes = 64;
        cfg.max_unanswered_bytes = 128;
        cfg.max_streams = 4;
    }
    let limit = cfg.max_report_bytes;
    let mut h = Harness::new(cfg, server_seed(1));
    h.outbox = Some(Vec::new());
    h.endpoint_checks = false;
    h.hold = flags & FLAG_HOLD != 0;
    if flags & FLAG_NOT_RECORDED != 0 {
        h.outcome = Outcome::NotRecorded("fuzz".into());
    }
    let mut rng = CoreRng::from_seed(server_seed(3));
    let alpn: &[u8] = if hq { HQ_ALPN } else { ALPN };
    let raw = RawPeer::connect(addr(PEERS[0]), h.server_addr, &[alpn], &mut rng);
    let mut p = Peer {
        raw,
        pending: BTreeMap::new(),
        sent: BTreeMap::new(),
        buf: vec![0; 65536],
        out: vec![0; 65536],
    };
    exchange(&mut h, &mut p);
    assert!(
        p.raw.conn.is_established() && h.opened.len() == 1,
        "the handshake completes"
    );
    for op in decode_ops(rest) {
        match op {
            Op::Write { stream, data, fin } => p.queue(u64::from(stream % 16) * 4, data, fin),
            Op::Report {
                stream,
                client,
                seq,
                fin,
            } => {
                let r = format!(r#"{{"client":"c{client}","seq":{seq},"s":{stream}}}"#);
                p.queue(u64::from(stream % 16) * 4, r.as_bytes(), fin);
            }
            Op::Reset(s) => {
                let sid = u64::from(s % 16) * 4;
                if p.raw
                    .conn
                    .stream_shutdown(sid, quiche::Shutdown::Write, 7)
                    .is_ok()
                {
                    p.sent.entry(sid).or_default().reset = true;
                }
                p.pending.remove(&sid);
            }
            Op::Stop(s) => {
                let sid = u64::from(s % 16) * 4;
                if p.raw
                    .conn
                    .stream_shutdown(sid, quiche::Shutdown::Read, 7)
                    .is_ok()
                {
                    p.sent.entry(sid).or_default().stopped = true;
                }
            }
            Op::Time(a) => {
                h.clock
                    .advance(Duration::from_millis(ADVANCE_MS[usize::from(a & 7)]));
                timers(&mut h, &mut p);
            }
            Op::Pause => p.raw.read_paused = !p.raw.read_paused,
            Op::Answer { not_recorded } => {
                let outcome = if not_recorded {
                    Outcome::NotRecorded("fuzz".into())
                } else {
                    Outcome::Recorded
                };
                h.answer_held(&outcome);
            }
            Op::Close => {
                let _ = p.raw.conn.close(true, 0, b"fuzz");
            }
        }
        exchange(&mut h, &mut p);
    }
    // The end: the application answers what it holds, the client reads.
    h.hold = false;
    let outcome = h.outcome.clone();
    h.answer_held(&outcome);
    p.raw.read_paused = false;
    exchange(&mut h, &mut p);
    let checked = check_streams(&h, &p, limit, hq);
    h.outbox = None;
    h.shutdown();
    checked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip() {
        let ops = [
            Op::Write {
                stream: 3,
                data: b"{}",
                fin: true,
            },
            Op::Report {
                stream: 1,
                client: 5,
                seq: 9,
                fin: false,
            },
            Op::Reset(2),
            Op::Stop(4),
            Op::Time(7),
            Op::Pause,
            Op::Answer { not_recorded: true },
            Op::Close,
        ];
        let mut v = Vec::new();
        encode_ops(FLAG_HOLD, &ops, &mut v);
        assert_eq!(v[0], FLAG_HOLD);
        assert_eq!(decode_ops(&v[1..]), ops);
        assert_eq!(decode_ops(&[0, 1]), vec![], "a truncated op is dropped");
    }

    #[test]
    fn a_report_and_its_answer() {
        let mut v = Vec::new();
        let ops = [
            Op::Report {
                stream: 0,
                client: 1,
                seq: 1,
                fin: true,
            },
            Op::Write {
                stream: 1,
                data: b"{\"a\":1}[",
                fin: true,
            },
        ];
        encode_ops(0, &ops, &mut v);
        assert_eq!(
            server_streams(&v),
            3,
            "a report, an object and an error answered"
        );
        let mut v = Vec::new();
        encode_ops(
            FLAG_HQ,
            &[Op::Write {
                stream: 0,
                data: b"GET /latest\r\n",
                fin: true,
            }],
            &mut v,
        );
        assert_eq!(server_streams(&v), 1);
    }
}
