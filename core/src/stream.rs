//! The receive side of one report stream: [`ObjectSplitter`] turns the bytes
//! of one QUIC stream (in order, in chunks of any size, down to one byte)
//! into a sequence of JSON objects, or a precise [`StreamError`].
//!
//! It owns the bytes of the value currently being received and nothing else:
//! whitespace between values is skipped without being buffered, and a value's
//! bytes leave with its item (or are dropped with its error) as soon as it is
//! complete, so memory stays bounded by `max_object_len`.
//!
//! Every byte is looked at once by a small scanner; the complete bytes of a
//! value are checked exactly once, when its last byte arrives, by one
//! `serde_json` pass (see [`JsonObject`]; no map is built).
//!
//! ```text
//!   Idle --first byte that is not whitespace--> Value --its last byte--> Idle, Ok item
//!   (whitespace: skipped)                         |
//!     |                                           | not UTF-8 / not JSON / not an
//!     | FIN before any object                     | object / over the limit /
//!     v                                           | FIN inside it
//!   Failed <--------------------------------------+
//!
//!   Value:  object/array  ends when the depth over {[ and }] (outside strings) is 0;
//!                         nesting deeper than MAX_DEPTH is invalid JSON at once
//!           string        ends at its closing quote (escapes skipped)
//!           bare scalar   ends at whitespace, at one of {}[]",: or at FIN
//!   Failed: one Err item, the last ever; the buffer is freed, input is ignored
//! ```

use std::collections::VecDeque;

use crate::error::StreamError;
use crate::object::{Hints, JsonObject, MAX_DEPTH, is_whitespace};

/// One item the splitter produced.
pub type Item = Result<JsonObject, StreamError>;

/// The most a value's buffer reserves when it starts (it reserves the bytes
/// in hand, up to this; it grows as more come).
const FIRST_RESERVE_MAX: usize = 4096;

/// Where the scanner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Between values: whitespace is skipped, anything else starts a value.
    Idle,
    /// Inside a top-level object or array.
    Container {
        /// Open `{`/`[` minus closing `}`/`]` seen so far (outside strings).
        depth: usize,
        /// Inside a string nested in the container.
        in_string: bool,
        /// The previous byte was a backslash inside that string.
        escape: bool,
    },
    /// Inside a top-level string (the opening quote has been seen).
    String {
        /// The previous byte was a backslash.
        escape: bool,
    },
    /// Inside a bare top-level scalar (number, literal, or garbage).
    Scalar,
}

/// Splits the bytes of one stream into JSON objects. See the module docs.
///
/// Feed it with [`push`](Self::push) and [`finish`](Self::finish), and take
/// what it produced with [`next_item`](Self::next_item) after each call.
#[derive(Debug)]
pub struct ObjectSplitter {
    /// The largest value in bytes.
    max_object_len: usize,
    /// The bytes of the value in progress (empty when `scan` is `Idle`).
    buf: Vec<u8>,
    /// The scanner's state, carried from one push to the next.
    scan: Scan,
    /// Items produced and not yet taken, in stream order.
    ready: VecDeque<Item>,
    /// `finish` was called.
    finished: bool,
    /// A fatal error was produced; all further input is ignored.
    failed: bool,
    /// Ok items produced so far.
    objects: u64,
    /// What the scanner saw in the value in progress, for its parse.
    hints: Hints,
}

impl ObjectSplitter {
    /// `max_object_len`: the largest object in bytes (from its first byte, the
    /// opening `{`, to its last, the closing `}`).
    pub fn new(max_object_len: usize) -> ObjectSplitter {
        ObjectSplitter {
            max_object_len,
            buf: Vec::new(),
            scan: Scan::Idle,
            ready: VecDeque::new(),
            finished: false,
            failed: false,
            objects: 0,
            hints: Hints::default(),
        }
    }

    /// Feeds the next bytes of the stream, in stream order. After a fatal
    /// error (see below) further input is ignored, as is input after
    /// [`finish`](Self::finish).
    ///
    /// Every complete object in `data` is ready at once in
    /// [`next_item`](Self::next_item); a fatal error is produced as soon as it
    /// is known (a value over the limit, a syntax error, a non-object).
    pub fn push(&mut self, data: &[u8]) {
        if self.failed || self.finished {
            return;
        }
        let mut rest = data;
        while !rest.is_empty() && !self.failed {
            if self.scan == Scan::Idle {
                let skip = rest
                    .iter()
                    .position(|&b| !is_whitespace(b))
                    .unwrap_or(rest.len());
                rest = &rest[skip..];
                let Some((&first, tail)) = rest.split_first() else {
                    break;
                };
                rest = tail;
                if self.max_object_len == 0 {
                    self.fail(StreamError::TooLarge { limit: 0 });
                    break;
                }
                if self.buf.capacity() == 0 {
                    // One allocation for a report that came in one chunk,
                    // instead of a doubling series from 8 bytes; never more
                    // than the bytes in hand (no memory for a peer that
                    // sends nothing).
                    let want = (rest.len() + 1).min(FIRST_RESERVE_MAX);
                    self.buf.reserve(want.min(self.max_object_len));
                }
                self.buf.push(first);
                self.hints = Hints::default();
                self.scan = match first {
                    b'{' | b'[' => Scan::Container {
                        depth: 1,
                        in_string: false,
                        escape: false,
                    },
                    b'"' => Scan::String { escape: false },
                    // Cannot start a value, and would end a scalar at once:
                    // a complete (invalid) value of its own.
                    b'}' | b']' | b',' | b':' => {
                        self.complete();
                        continue;
                    }
                    _ => Scan::Scalar,
                };
                continue;
            }

            // Scan at most one byte past the room left, so a value over the
            // limit is caught without scanning the whole chunk, while a
            // scalar of exactly the limit can still see its delimiter.
            let room = self.max_object_len.saturating_sub(self.buf.len());
            let window = &rest[..rest.len().min(room.saturating_add(1))];
            let (used, ended) = self.advance(window);
            if used > room {
                self.fail(StreamError::TooLarge {
                    limit: self.max_object_len,
                });
                break;
            }
            self.buf.extend_from_slice(&rest[..used]);
            rest = &rest[used..];
            if ended {
                self.complete();
            }
        }
    }

    /// The peer's FIN arrived: no more bytes will come.
    ///
    /// A bare scalar in progress completes here; an unfinished object, array
    /// or string is [`StreamError::Truncated`]; a stream with nothing but
    /// whitespace is [`StreamError::Empty`].
    pub fn finish(&mut self) {
        if self.failed || self.finished {
            return;
        }
        self.finished = true;
        match self.scan {
            Scan::Idle => {
                if self.objects == 0 {
                    self.fail(StreamError::Empty);
                }
            }
            Scan::Scalar => self.complete(),
            Scan::Container { .. } | Scan::String { .. } => self.fail(StreamError::Truncated),
        }
    }

    /// The peer abandoned the stream (RESET_STREAM): the value in progress
    /// is dropped without an error item (nobody is left to read one), its
    /// bytes are freed, and no more input is taken. Items already complete
    /// stay ready.
    pub fn abandon(&mut self) {
        self.finished = true;
        self.buf = Vec::new();
        self.scan = Scan::Idle;
    }

    /// The next complete item, in stream order, or None if none is ready yet.
    pub fn next_item(&mut self) -> Option<Item> {
        self.ready.pop_front()
    }

    /// True once a fatal error item has been produced (it is the last item
    /// ever).
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// True once finish() was called and every item has been taken with
    /// next_item (or the splitter failed and its error item was taken).
    pub fn is_done(&self) -> bool {
        (self.finished || self.failed) && self.ready.is_empty()
    }

    /// Objects produced so far (Ok items).
    pub fn objects(&self) -> u64 {
        self.objects
    }

    /// Bytes currently buffered (for memory accounting by the caller): the
    /// bytes of the value in progress. Items waiting in
    /// [`next_item`](Self::next_item) are not counted; take them after each
    /// push.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Runs the scanner over `data`, the bytes following those in `buf`.
    /// Returns how many bytes belong to the value in progress and whether
    /// the value ended within them. A scalar's terminating delimiter is not
    /// counted.
    fn advance(&mut self, data: &[u8]) -> (usize, bool) {
        match &mut self.scan {
            Scan::Idle => (0, false),
            Scan::Scalar => match data
                .iter()
                .position(|&b| is_whitespace(b) || is_delimiter(b))
            {
                Some(end) => (end, true),
                None => (data.len(), false),
            },
            Scan::String { escape } => {
                for (i, &b) in data.iter().enumerate() {
                    if *escape {
                        *escape = false;
                    } else if b == b'\\' {
                        *escape = true;
                    } else if b == b'"' {
                        return (i + 1, true);
                    }
                }
                (data.len(), false)
            }
            Scan::Container {
                depth,
                in_string,
                escape,
            } => {
                let mut i = 0;
                while i < data.len() {
                    if *in_string {
                        if *escape {
                            *escape = false;
                            i += 1;
                            continue;
                        }
                        // Strings are most of a report: jump to the next
                        // quote or backslash.
                        let Some(j) = memchr::memchr2(b'"', b'\\', &data[i..]) else {
                            return (data.len(), false);
                        };
                        i += j;
                        if data[i] == b'\\' {
                            *escape = true;
                        } else {
                            *in_string = false;
                        }
                        i += 1;
                        continue;
                    }
                    match data[i] {
                        b'"' => *in_string = true,
                        b'{' | b'[' => {
                            *depth += 1;
                            if *depth > MAX_DEPTH {
                                return (i + 1, true);
                            }
                        }
                        b'}' | b']' => {
                            *depth -= 1;
                            if *depth == 0 {
                                return (i + 1, true);
                            }
                        }
                        b' ' | b'\t' | b'\n' | b'\r' => self.hints.loose = true,
                        _ => {}
                    }
                    i += 1;
                }
                (data.len(), false)
            }
        }
    }

    /// The value in `buf` is complete: classify it, queue the item, and get
    /// ready for the next value.
    fn complete(&mut self) {
        // The value's bytes become the object's, without a copy; the next
        // value starts a buffer of its own.
        let bytes = std::mem::take(&mut self.buf);
        let item = match self.scan {
            Scan::Container { depth, .. } if depth > MAX_DEPTH => Err(StreamError::InvalidJson(
                format!("nested deeper than {MAX_DEPTH} levels"),
            )),
            _ => JsonObject::parse_hinted(bytes, self.hints),
        };
        self.scan = Scan::Idle;
        match item {
            Ok(object) => {
                self.objects += 1;
                self.ready.push_back(Ok(object));
            }
            Err(err) => self.fail(err),
        }
    }

    /// Produces the fatal error item: frees the buffer and ignores all
    /// further input.
    fn fail(&mut self, err: StreamError) {
        self.failed = true;
        self.scan = Scan::Idle;
        self.buf = Vec::new();
        self.ready.push_back(Err(err));
    }
}

/// A byte that ends a bare scalar (and is not part of it).
fn is_delimiter(b: u8) -> bool {
    matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Map, Value, json};

    /// An item with the object as a map, to compare with `json!` values.
    type MapItem = Result<Map<String, Value>, StreamError>;

    /// The next item, its object as a map.
    fn next(s: &mut ObjectSplitter) -> Option<MapItem> {
        s.next_item().map(|i| i.map(|o| o.to_map()))
    }

    const LIMIT: usize = 64 * 1024;

    /// The object `v` (a `json!` object) as a map.
    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("test bug: {other} is not an object"),
        }
    }

    /// Takes every item that is ready.
    fn drain(s: &mut ObjectSplitter) -> Vec<MapItem> {
        std::iter::from_fn(|| next(s)).collect()
    }

    /// Pushes each chunk (taking items after each), then FIN; every item.
    fn run_chunks(chunks: &[&[u8]], limit: usize) -> Vec<MapItem> {
        let mut s = ObjectSplitter::new(limit);
        let mut items = Vec::new();
        for c in chunks {
            s.push(c);
            items.extend(drain(&mut s));
        }
        s.finish();
        items.extend(drain(&mut s));
        assert!(s.is_done(), "not done after FIN and draining");
        assert!(next(&mut s).is_none());
        items
    }

    fn run(data: &[u8]) -> Vec<MapItem> {
        run_chunks(&[data], LIMIT)
    }

    fn run_bytewise(data: &[u8], limit: usize) -> Vec<MapItem> {
        let chunks: Vec<&[u8]> = data.chunks(1).collect();
        run_chunks(&chunks, limit)
    }

    fn is_invalid_json(items: &[MapItem]) -> bool {
        matches!(items, [Err(StreamError::InvalidJson(_))])
    }

    /// Three objects with nested braces, escaped quotes and backslashes in
    /// strings, and whitespace of every kind between them.
    const THREE: &[u8] = br#"{"a":{"b":[1,{"c":"}{]["}]},"q":"say \"hi\" \\"}
	{"x":"\\\"}","y":[[],{}],"z":"\u007b\u00e9\ud83d\ude00"}  
{"n":-1.5e3,"t":true,"f":false,"u":null,"e":"","s":"a\\\\\"b{"}"#;

    fn three_expected() -> Vec<MapItem> {
        vec![
            Ok(obj(json!({"a":{"b":[1,{"c":"}{]["}]},"q":"say \"hi\" \\"}))),
            Ok(obj(json!({"x":"\\\"}","y":[[],{}],"z":"{\u{e9}\u{1f600}"}))),
            Ok(obj(
                json!({"n":-1.5e3,"t":true,"f":false,"u":null,"e":"","s":"a\\\\\"b{"}),
            )),
        ]
    }

    #[test]
    fn one_object() {
        assert_eq!(run(br#"{"a":1}"#), vec![Ok(obj(json!({"a":1})))]);
        assert_eq!(run(b"{}"), vec![Ok(Map::new())]);
        assert_eq!(
            run(b" \t\r\n{ \"a\" : 1 } \r\n"),
            vec![Ok(obj(json!({"a":1})))]
        );
    }

    /// From review: a chunk of many small objects left each holding the
    /// rest of the chunk's reservation (up to 4 KiB for `{}`) for as long as
    /// its report waited.
    #[test]
    fn a_small_object_keeps_no_more_than_a_little_slack() {
        let mut s = ObjectSplitter::new(LIMIT);
        s.push("{}".repeat(1000).as_bytes());
        let o = s.next_item().expect("an item").expect("an object");
        let (json, _) = o.into_parts();
        assert_eq!(json, b"{}");
        assert!(json.capacity() <= 2 + 64, "{} bytes held", json.capacity());
    }

    #[test]
    fn objects_back_to_back() {
        let want = vec![Ok(obj(json!({"a":1}))), Ok(obj(json!({"b":2})))];
        assert_eq!(run(br#"{"a":1}{"b":2}"#), want);
        assert_eq!(run(b"{\"a\":1}\n{\"b\":2}\n"), want);
        assert_eq!(run(b"{\"a\":1}\r\n\r\n{\"b\":2}\r\n"), want);
        assert_eq!(run(b"  {\"a\":1} \t {\"b\":2}  "), want);
    }

    #[test]
    fn nested_object_with_tricky_strings() {
        let items = run(br#"{"o":{"p":{"q":"{{}}[]"}},"esc":"\"}\\","u":"\u0041\u00e9\u20ac\ud83d\ude00","l":[{"k":"]"}]}"#);
        assert_eq!(
            items,
            vec![Ok(obj(json!({
                "o": {"p": {"q": "{{}}[]"}},
                "esc": "\"}\\",
                "u": "A\u{e9}\u{20ac}\u{1f600}",
                "l": [{"k": "]"}],
            })))]
        );
    }

    #[test]
    fn three_objects_unsplit() {
        assert_eq!(run(THREE), three_expected());
    }

    #[test]
    fn every_split_point_gives_the_same_items() {
        let want = run(THREE);
        assert_eq!(want, three_expected());
        for at in 0..=THREE.len() {
            let (a, b) = THREE.split_at(at);
            assert_eq!(run_chunks(&[a, b], LIMIT), want, "split at {at}");
        }
    }

    #[test]
    fn one_byte_at_a_time_gives_the_same_items() {
        assert_eq!(run_bytewise(THREE, LIMIT), three_expected());
    }

    #[test]
    fn every_split_point_of_errors_gives_the_same_items() {
        let streams: &[&[u8]] = &[
            b"{\"a\":1}x",
            b"{\"a\":1} 42 ",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":}",
            b"{\"a\":1",
            b"[1,{\"a\":\"]\"}]",
            b"{\"a\":1}\"s\\\"\"",
            b"{\"a\":1}true",
        ];
        for stream in streams {
            let want = run(stream);
            assert!(matches!(want.last(), Some(Err(_))), "{want:?}");
            for at in 0..=stream.len() {
                let (a, b) = stream.split_at(at);
                assert_eq!(run_chunks(&[a, b], LIMIT), want, "split at {at}");
            }
            assert_eq!(run_bytewise(stream, LIMIT), want);
        }
    }

    #[test]
    fn objects_are_ready_before_fin() {
        let mut s = ObjectSplitter::new(LIMIT);
        s.push(br#"{"a":1}{"b""#);
        assert_eq!(next(&mut s), Some(Ok(obj(json!({"a":1})))));
        assert_eq!(next(&mut s), None);
        assert_eq!(s.buffered(), 4);
        s.push(br#":2}"#);
        assert_eq!(next(&mut s), Some(Ok(obj(json!({"b":2})))));
        assert_eq!(s.buffered(), 0);
        assert!(!s.is_done());
        assert!(!s.is_failed());
        s.finish();
        assert!(s.is_done());
        assert_eq!(next(&mut s), None);
    }

    #[test]
    fn empty_stream() {
        assert_eq!(run(b""), vec![Err(StreamError::Empty)]);
        assert_eq!(run_chunks(&[], LIMIT), vec![Err(StreamError::Empty)]);
        assert_eq!(run(b" \t\r\n \n"), vec![Err(StreamError::Empty)]);
    }

    #[test]
    fn whitespace_after_objects_is_not_an_error() {
        let items = run(b"{\"a\":1}\n \t\r\n");
        assert_eq!(items, vec![Ok(obj(json!({"a":1})))]);
    }

    #[test]
    fn not_utf8() {
        assert_eq!(run(b"{\"a\":\"\xff\"}"), vec![Err(StreamError::NotUtf8)]);
        assert_eq!(run(b"{\"a\":\"\xc3\"}"), vec![Err(StreamError::NotUtf8)]);
        assert_eq!(run(b"\xff"), vec![Err(StreamError::NotUtf8)]);
        assert_eq!(run(b"{\xff:1}"), vec![Err(StreamError::NotUtf8)]);
        // Valid multi-byte UTF-8 is fine.
        assert_eq!(
            run("{\"é\":\"€😀\"}".as_bytes()),
            vec![Ok(obj(json!({"é":"€😀"})))]
        );
    }

    #[test]
    fn invalid_json() {
        assert!(is_invalid_json(&run(b"hello")));
        assert!(is_invalid_json(&run(b"{\"a\":}")));
        assert!(is_invalid_json(&run(b"{\"a\":NaN}")));
        assert!(is_invalid_json(&run(b"{\"a\":Infinity}")));
        assert!(is_invalid_json(&run(b"{\"a\":-Infinity}")));
        assert!(is_invalid_json(&run(b"{\"a\":1,}")));
        assert!(is_invalid_json(&run(b"{'a':1}")));
        assert!(is_invalid_json(&run(b"{\"a\":1 /* c */}")));
        assert!(is_invalid_json(&run(b"{\"a\":01}")));
        assert!(is_invalid_json(&run(b"{\"a\":\"\\x\"}")));
        assert!(is_invalid_json(&run(b"{\"a\":\"tab\there\"}")));
        assert!(is_invalid_json(&run(b"{]")));
        assert!(is_invalid_json(&run(b"}")));
        assert!(is_invalid_json(&run(b",{\"a\":1}")));
        assert!(is_invalid_json(&run(b"tru")));
        match &run(b"{\"a\":}")[..] {
            [Err(StreamError::InvalidJson(why))] => {
                assert!(why.contains("expected value"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_json_is_reported_before_fin() {
        let mut s = ObjectSplitter::new(LIMIT);
        s.push(b"hello ");
        assert!(matches!(
            next(&mut s),
            Some(Err(StreamError::InvalidJson(_)))
        ));
        assert!(s.is_failed());
        let mut s = ObjectSplitter::new(LIMIT);
        s.push(b"{\"a\":NaN}");
        assert!(matches!(
            next(&mut s),
            Some(Err(StreamError::InvalidJson(_)))
        ));
    }

    #[test]
    fn not_an_object() {
        let cases: &[(&[u8], &str)] = &[
            (b"[1,2]", "array"),
            (b"[]", "array"),
            (b"\"str\"", "string"),
            (b"\"{\\\"a\\\":1}\"", "string"),
            (b"42", "number"),
            (b"-1.5e3", "number"),
            (b"true", "boolean"),
            (b"false", "boolean"),
            (b"null", "null"),
        ];
        for &(input, kind) in cases {
            assert_eq!(
                run(input),
                vec![Err(StreamError::NotAnObject(kind))],
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn not_an_object_is_reported_before_fin() {
        let cases: &[(&[u8], &str)] = &[
            (b"[1,2]", "array"),
            (b"\"str\"", "string"),
            (b"true\n", "boolean"),
            (b"42 ", "number"),
            (b"7{\"a\":1}", "number"),
            (b"null,", "null"),
        ];
        for &(input, kind) in cases {
            let mut s = ObjectSplitter::new(LIMIT);
            s.push(input);
            assert_eq!(drain(&mut s), vec![Err(StreamError::NotAnObject(kind))]);
            assert!(s.is_failed());
            assert!(s.is_done());
        }
        // A bare scalar cannot end before FIN or a delimiter: 42 may be 420.
        let mut s = ObjectSplitter::new(LIMIT);
        s.push(b"42");
        assert_eq!(next(&mut s), None);
        s.push(b"0");
        s.finish();
        assert_eq!(next(&mut s), Some(Err(StreamError::NotAnObject("number"))));
    }

    #[test]
    fn truncated() {
        for input in [
            &b"{\"a\":1"[..],
            b"{",
            b"{\"a\":\"}",
            b"{\"a\":\"\\",
            b"[1,",
            b"\"abc",
            b"\"abc\\\"",
            b"{\"a\":1}{\"b\":[",
        ] {
            let items = run(input);
            assert_eq!(
                items.last(),
                Some(&Err(StreamError::Truncated)),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            run(b"{\"a\":1}{\"b\":"),
            vec![Ok(obj(json!({"a":1}))), Err(StreamError::Truncated)]
        );
    }

    /// `{"k":"xxx..."}` of exactly `len` bytes.
    fn object_of_len(len: usize) -> Vec<u8> {
        let overhead = br#"{"k":""}"#.len();
        assert!(len >= overhead, "test bug");
        let mut v = br#"{"k":""#.to_vec();
        v.extend(std::iter::repeat_n(b'x', len - overhead));
        v.extend_from_slice(br#""}"#);
        assert_eq!(v.len(), len);
        v
    }

    #[test]
    fn object_of_exactly_the_limit_is_ok() {
        let limit = 100;
        let o = object_of_len(limit);
        let want = vec![Ok(obj(json!({"k": "x".repeat(limit - 8)})))];
        assert_eq!(run_chunks(&[&o], limit), want);
        assert_eq!(run_bytewise(&o, limit), want);
        // Surrounding whitespace does not count.
        assert_eq!(run_chunks(&[b"  \n", &o, b"\n  "], limit), want);
        // Nor do earlier objects: the limit is per object.
        let mut two = o.clone();
        two.extend_from_slice(&o);
        assert_eq!(run_chunks(&[&two], limit).len(), 2);
        assert_eq!(run_bytewise(&two, limit).len(), 2);
    }

    #[test]
    fn object_over_the_limit_is_too_large() {
        let limit = 100;
        let o = object_of_len(limit + 1);
        let want = vec![Err(StreamError::TooLarge { limit })];
        assert_eq!(run_chunks(&[&o], limit), want);
        assert_eq!(run_bytewise(&o, limit), want);
        for at in 0..=o.len() {
            let (a, b) = o.split_at(at);
            assert_eq!(run_chunks(&[a, b], limit), want, "split at {at}");
        }
        // After a good one.
        let mut s = ObjectSplitter::new(limit);
        s.push(&object_of_len(limit));
        s.push(&o);
        assert!(matches!(next(&mut s), Some(Ok(_))));
        assert_eq!(next(&mut s), Some(Err(StreamError::TooLarge { limit })));
    }

    #[test]
    fn too_large_is_detected_before_fin_and_frees_the_buffer() {
        let limit = 100;
        let mut s = ObjectSplitter::new(limit);
        s.push(b"{\"k\":\"");
        for _ in 0..limit {
            if s.is_failed() {
                break;
            }
            assert!(s.buffered() <= limit);
            s.push(b"x");
        }
        assert!(s.is_failed());
        assert_eq!(s.buffered(), 0);
        assert_eq!(next(&mut s), Some(Err(StreamError::TooLarge { limit })));
        assert!(s.is_done());
        // A huge chunk: caught without waiting for FIN.
        let mut s = ObjectSplitter::new(limit);
        s.push(&vec![b'['; 1 << 20]);
        assert_eq!(next(&mut s), Some(Err(StreamError::TooLarge { limit })));
        assert_eq!(s.buffered(), 0);
    }

    #[test]
    fn too_large_applies_to_every_kind_of_value() {
        let limit = 4;
        let tl = vec![Err(StreamError::TooLarge { limit })];
        assert_eq!(run_chunks(&[b"12345"], limit), tl);
        assert_eq!(run_chunks(&[b"\"abcd\""], limit), tl);
        assert_eq!(run_chunks(&[b"[1,2]"], limit), tl);
        // Exactly the limit: classified normally, whatever ends the scalar.
        let nao = vec![Err(StreamError::NotAnObject("number"))];
        assert_eq!(run_chunks(&[b"1234"], limit), nao);
        assert_eq!(run_chunks(&[b"1234 "], limit), nao);
        assert_eq!(run_chunks(&[b"1234,"], limit), nao);
        assert_eq!(run_bytewise(b"1234 ", limit), nao);
        // A limit of zero refuses everything but whitespace.
        assert_eq!(
            run_chunks(&[b"  {}"], 0),
            vec![Err(StreamError::TooLarge { limit: 0 })]
        );
        assert_eq!(run_chunks(&[b"  "], 0), vec![Err(StreamError::Empty)]);
    }

    #[test]
    fn input_after_a_fatal_error_is_ignored() {
        let mut s = ObjectSplitter::new(LIMIT);
        s.push(b"{\"a\":1}[1]{\"b\":2}");
        assert!(s.is_failed());
        assert!(!s.is_done(), "items are still waiting");
        assert_eq!(next(&mut s), Some(Ok(obj(json!({"a":1})))));
        assert_eq!(next(&mut s), Some(Err(StreamError::NotAnObject("array"))));
        assert!(s.is_done());
        assert_eq!(next(&mut s), None);
        s.push(b"{\"c\":3}");
        s.push(b"garbage");
        assert_eq!(next(&mut s), None);
        assert_eq!(s.buffered(), 0);
        s.finish();
        assert_eq!(next(&mut s), None);
        assert!(s.is_failed());
        assert!(s.is_done());
        assert_eq!(s.objects(), 1);
    }

    #[test]
    fn error_after_fin_is_the_last_item() {
        let mut s = ObjectSplitter::new(LIMIT);
        s.push(b"{\"a\":1");
        s.finish();
        assert!(s.is_failed());
        assert_eq!(next(&mut s), Some(Err(StreamError::Truncated)));
        assert_eq!(next(&mut s), None);
        s.finish();
        s.push(b"}");
        assert_eq!(next(&mut s), None);
        assert!(s.is_done());
    }

    #[test]
    fn bytes_after_an_object_start_the_next_value() {
        let items = run(b"{\"a\":1}x");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], Ok(obj(json!({"a":1}))));
        assert!(matches!(items[1], Err(StreamError::InvalidJson(_))));
        // Before FIN only the object is out: `x` may still become `xyz`.
        let mut s = ObjectSplitter::new(LIMIT);
        s.push(b"{\"a\":1}x");
        assert!(matches!(next(&mut s), Some(Ok(_))));
        assert_eq!(next(&mut s), None);
        assert!(!s.is_failed());
    }

    #[test]
    fn whitespace_flood_is_not_buffered() {
        let mut s = ObjectSplitter::new(LIMIT);
        let spaces = vec![b' '; 1 << 20];
        s.push(&spaces);
        assert_eq!(s.buffered(), 0);
        for chunk in spaces.chunks(1000) {
            s.push(chunk);
            assert_eq!(s.buffered(), 0);
        }
        s.push(b"{\"a\":1}");
        s.push(b"\n\r\t ".repeat(1 << 18).as_slice());
        assert_eq!(s.buffered(), 0);
        assert_eq!(next(&mut s), Some(Ok(obj(json!({"a":1})))));
        s.finish();
        assert_eq!(next(&mut s), None);
        assert!(s.is_done());
        assert!(!s.is_failed());
    }

    #[test]
    fn whitespace_flood_then_fin_is_empty() {
        let mut s = ObjectSplitter::new(16);
        s.push(&vec![b'\n'; 1 << 20]);
        assert_eq!(s.buffered(), 0);
        s.finish();
        assert_eq!(next(&mut s), Some(Err(StreamError::Empty)));
    }

    #[test]
    fn large_object_one_byte_at_a_time() {
        // A 64 KiB object with nesting and escapes, one byte per push: the
        // scanner looks at each byte once, so this is linear.
        let mut o = b"{\"list\":[".to_vec();
        let mut i = 0;
        while o.len() < LIMIT - 64 {
            o.extend_from_slice(format!("{{\"i\":{i},\"s\":\"\\\"}}{{\"}},").as_bytes());
            i += 1;
        }
        o.extend_from_slice(b"{}],\"pad\":\"");
        o.extend(std::iter::repeat_n(b'p', LIMIT - o.len() - 2));
        o.extend_from_slice(b"\"}");
        assert_eq!(o.len(), LIMIT);

        let mut s = ObjectSplitter::new(LIMIT);
        for (n, b) in o.iter().enumerate() {
            assert_eq!(next(&mut s), None);
            s.push(std::slice::from_ref(b));
            if n + 1 < o.len() {
                assert_eq!(s.buffered(), n + 1);
            }
        }
        let map = match next(&mut s) {
            Some(Ok(map)) => map,
            other => panic!("{other:?}"),
        };
        assert_eq!(map["list"].as_array().map(Vec::len), Some(i + 1));
        assert_eq!(map["list"][0]["s"], "\"}{");
        assert_eq!(s.buffered(), 0);
        assert_eq!(s.objects(), 1);
        s.finish();
        assert!(s.is_done());
    }

    #[test]
    fn abandon_frees_the_partial_value_and_ends_quietly() {
        let mut s = ObjectSplitter::new(1024);
        s.push(br#"{"a":1}{"b":"unfinis"#);
        assert!(s.buffered() > 0);
        s.abandon();
        assert_eq!(s.buffered(), 0);
        assert!(
            matches!(next(&mut s), Some(Ok(_))),
            "the complete object stays"
        );
        assert!(
            next(&mut s).is_none(),
            "no error item for the abandoned one"
        );
        assert!(s.is_done() && !s.is_failed());
        s.push(b"{}");
        assert!(next(&mut s).is_none(), "no input after abandon");
    }

    #[test]
    fn objects_counts_ok_items() {
        let mut s = ObjectSplitter::new(LIMIT);
        assert_eq!(s.objects(), 0);
        s.push(b"{}{\"a\":1}\n{");
        assert_eq!(s.objects(), 2);
        s.push(b"}");
        assert_eq!(s.objects(), 3);
        s.push(b"[]");
        assert_eq!(s.objects(), 3);
        assert_eq!(drain(&mut s).len(), 4);
        assert_eq!(s.objects(), 3);
    }

    #[test]
    fn is_done_waits_for_fin_and_for_items_to_be_taken() {
        let mut s = ObjectSplitter::new(LIMIT);
        assert!(!s.is_done());
        s.push(b"{}");
        assert!(!s.is_done());
        s.finish();
        assert!(!s.is_done(), "an item is still waiting");
        assert_eq!(next(&mut s), Some(Ok(Map::new())));
        assert!(s.is_done());
        assert!(!s.is_failed());
    }

    #[test]
    fn objects_are_kept_compact_and_fully_checked() {
        let data = b"{ \"a\" : \"x \\u0041\" ,\n \"b\":[1, 2] }{\"c\":\"\\ud800\"}";
        for size in [1, 2, 3, 7, data.len()] {
            let mut s = ObjectSplitter::new(LIMIT);
            for c in data.chunks(size) {
                s.push(c);
            }
            let first = s.next_item().expect("first item").expect("a valid object");
            assert_eq!(
                first.json(),
                br#"{"a":"x \u0041","b":[1,2]}"#,
                "chunks of {size}"
            );
            // A lone surrogate is caught even though the scan skips strings.
            assert!(
                matches!(s.next_item(), Some(Err(StreamError::InvalidJson(_)))),
                "chunks of {size}"
            );
        }
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let depth = 100_000;
        let mut v = vec![b'['; depth];
        v.extend(vec![b']'; depth]);
        assert!(is_invalid_json(&run_chunks(&[&v], 1 << 20)));
        // Refused as soon as it is too deep, without waiting for the rest.
        let mut s = ObjectSplitter::new(1 << 20);
        s.push(&v[..depth]);
        assert!(matches!(
            next(&mut s),
            Some(Err(StreamError::InvalidJson(_)))
        ));
        // The same limit as serde_json's: 127 levels parse, 128 do not.
        for (levels, ok) in [(MAX_DEPTH, true), (MAX_DEPTH + 1, false)] {
            let mut v = b"{\"a\":".to_vec();
            v.extend(vec![b'['; levels - 1]);
            v.extend(vec![b']'; levels - 1]);
            v.push(b'}');
            let full = serde_json::from_slice::<Value>(&v).is_ok();
            assert_eq!(full, ok, "serde_json at {levels} levels");
            assert_eq!(
                run(&v).first().is_some_and(Result::is_ok),
                ok,
                "{levels} levels"
            );
        }
        // Unbalanced closers at the top level are garbage, not an underflow.
        assert!(is_invalid_json(&run(b"]]]]")));
    }

    /// Random bytes (biased toward JSON punctuation) in random chunks never
    /// panic, at most one error comes out and it is last, and chunking never
    /// changes the items.
    #[test]
    fn random_input_never_panics_and_chunking_does_not_matter() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"{}[]\":,\\ \n1-eE.tfnulx\xff\xc3\xa9a";
        for _ in 0..500 {
            let len = (next() % 40) as usize;
            let data: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let limit = 8 + (next() % 40) as usize;
            let whole = run_chunks(&[&data], limit);
            let errors = whole.iter().filter(|i| i.is_err()).count();
            assert!(errors <= 1);
            if errors == 1 {
                assert!(whole.last().is_some_and(Result::is_err));
            }
            let mut chunks = Vec::new();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = 1 + (next() % 5) as usize;
                let (a, b) = rest.split_at(n.min(rest.len()));
                chunks.push(a);
                rest = b;
            }
            assert_eq!(run_chunks(&chunks, limit), whole, "{data:?}");
        }
    }
}
