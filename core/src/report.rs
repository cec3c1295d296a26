//! What travels on a report stream: the [`Sample`] a client fetched, the
//! report object built from it, the [`Report`] the server parsed, and the
//! [`Response`] line the server answers with.
//!
//! Wire format (`quic-report/1`): the client writes one JSON object per
//! stream; the server answers each object with one JSON object and `\n`:
//!
//! ```text
//! {"ok":true,"received":{..the report..}}
//! {"ok":true,"duplicate":true,"received":{..}}
//! {"ok":false,"code":"not_object","error":"report must be a JSON object, got array"}
//! ```

use std::fmt;

use serde_json::{Map, Value};

use crate::error::StreamError;
use crate::identity::{Identity, RecordKey};
use std::borrow::Cow;
use std::io::Write as _;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::object::{JsonObject, Seen, SeenSeed, is_whitespace};

/// Field: hex of the source connection ID of the connection that carried it.
pub const FIELD_ID: &str = "id";
/// Field: random hex naming the client process; with `seq`, the dedup key.
pub const FIELD_CLIENT: &str = "client";
/// Longest `client` the server takes, in bytes (ours are at most 64 hex
/// digits). The duplicate filter keeps every client's id, so an unbounded
/// one would let a peer fill the server's memory with a few reports.
pub const MAX_CLIENT_BYTES: usize = 256;
/// Field: the report's sequence number, increasing per client.
pub const FIELD_SEQ: &str = "seq";
/// Field: unix milliseconds when the value was fetched.
pub const FIELD_SAMPLED_AT: &str = "sampled_at_ms";
/// Field: the identity the server recorded the report under (see
/// [`crate::identity`]); the server adds it, and refuses a report whose
/// own `identity` differs from its connection's ([`CODE_FORBIDDEN`]).
pub const FIELD_IDENTITY: &str = "identity";

/// Response code for a report the server could not record (e.g. its sink
/// failed). The only error a client should retry.
pub const CODE_NOT_RECORDED: &str = "not_recorded";

/// Response code for a report, or a read, that the connection's identity
/// may not make (a report claiming another `identity`, a read of what is
/// not its own). Permanent: a client drops the report.
pub const CODE_FORBIDDEN: &str = "forbidden";

/// Response code for a report the server's store refuses for what it holds,
/// and always will (e.g. PostgreSQL's `jsonb` cannot take the escape
/// `\u0000`, which is valid JSON). Permanent: a client drops the report,
/// since sending it again would be refused again.
pub const CODE_UNSTORABLE: &str = "unstorable";

/// A value fetched from the source: its JSON object and when it was taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The source's JSON object (e.g. `{"value": 0.42}`).
    pub fields: Map<String, Value>,
    /// Unix milliseconds when the value was fetched (the caller's wall clock).
    pub sampled_at_ms: u64,
}

/// The memory held by a JSON object's entries (`serde_json`'s map keeps
/// insertion order: a vector of `(hash, key, value)` and an index of them),
/// an estimate that counts what each part owns by capacity.
fn entries_bytes(map: &Map<String, Value>) -> usize {
    map.iter()
        .map(|(k, v)| {
            std::mem::size_of::<(usize, String, Value)>()
                + 2 * std::mem::size_of::<usize>()
                + k.capacity()
                + value_heap_bytes(v)
        })
        .sum()
}

/// The memory `v` owns beyond its own `Value` (nesting is bounded by
/// `serde_json`'s parser, at 128 levels).
fn value_heap_bytes(v: &Value) -> usize {
    match v {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => s.capacity(),
        Value::Array(a) => {
            a.capacity() * std::mem::size_of::<Value>()
                + a.iter().map(value_heap_bytes).sum::<usize>()
        }
        Value::Object(m) => entries_bytes(m),
    }
}

/// A source answered something that is not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SampleError(pub String);

impl Sample {
    /// Parses a source's body; it must be one JSON object.
    pub fn from_json(body: &[u8], sampled_at_ms: u64) -> Result<Sample, SampleError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(fields)) => Ok(Sample {
                fields,
                sampled_at_ms,
            }),
            Ok(other) => Err(SampleError(format!(
                "source answered {}, not a JSON object",
                kind_of(&other)
            ))),
            Err(e) => Err(SampleError(format!("source answered invalid JSON: {e}"))),
        }
    }

    /// The most bytes [`Sample::encode_report`] can write for this sample,
    /// whatever the connection, client id (up to 64 characters) and seq.
    /// It can exceed the source's body: the fields are written out again
    /// (`1e2` becomes `100.0`). Compare it with the server's limit
    /// ([`crate::config::DEFAULT_MAX_REPORT_BYTES`] by default) before
    /// queueing a sample, or the server refuses the report for good.
    pub fn max_report_len(&self) -> usize {
        // The longest id (a connection ID in hex) and client id, without
        // allocating them: this runs for every queued sample.
        const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
        const _: () = assert!(ZEROS.len() >= 2 * quiche::MAX_CONN_ID_LEN && ZEROS.len() == 64);
        let mut out = Vec::new();
        self.encode_report(
            &ZEROS[..2 * quiche::MAX_CONN_ID_LEN],
            ZEROS,
            u64::MAX,
            &mut out,
        );
        out.len()
    }

    /// What this sample costs held in a queue: its report's most bytes
    /// ([`Sample::max_report_len`]), or the memory its parsed fields take
    /// when that is more. A body of many small values takes several times
    /// its length once parsed (`[0,0,...]`: 32 bytes per one-digit value),
    /// and a queue bound counted at the length alone would hold that many
    /// times its bytes.
    pub fn held_bytes(&self) -> usize {
        let parsed = std::mem::size_of::<Sample>() + entries_bytes(&self.fields);
        self.max_report_len().max(parsed)
    }

    /// Writes the report object for this sample: the source's fields plus
    /// `id`, `client`, `seq` and `sampled_at_ms` (ours win over the source's),
    /// without any `identity` of the source's (the server adds the
    /// connection's).
    pub fn encode_report(&self, conn_id: &str, client: &str, seq: u64, out: &mut Vec<u8>) {
        out.push(b'{');
        for (k, v) in &self.fields {
            if [FIELD_ID, FIELD_CLIENT, FIELD_SEQ, FIELD_SAMPLED_AT].contains(&k.as_str()) {
                continue; // ours win
            }
            if k == FIELD_IDENTITY {
                continue; // the server's: it sets it from our certificate
            }
            write_json_str(out, k);
            out.push(b':');
            serde_json::to_writer(&mut *out, v).expect("writing JSON into a Vec cannot fail");
            out.push(b',');
        }
        out.extend_from_slice(b"\"id\":");
        write_json_str(out, conn_id);
        out.extend_from_slice(b",\"client\":");
        write_json_str(out, client);
        write!(
            out,
            ",\"seq\":{seq},\"sampled_at_ms\":{}}}",
            self.sampled_at_ms
        )
        .expect("writing into a Vec cannot fail");
    }
}

/// A report as the server received it: the object's bytes as sent (without
/// whitespace between tokens), with the fields the protocol defines checked
/// and the dedup key pulled out. The server never builds a map of it.
///
/// The server binds each report to its connection's identity
/// ([`Report::bind_identity`]): its bytes then carry `"identity"` (added
/// last when the report had none), and that is what is recorded and echoed.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    json: Vec<u8>,
    /// `client`, when present.
    pub client: Option<String>,
    /// `seq`, when present.
    pub seq: Option<u64>,
    /// Who sent it: the identity of the connection that carried it (after
    /// [`Report::bind_identity`]), else what its own `identity` field says
    /// (anonymous when it has none).
    pub identity: Identity,
    /// The bytes have an `identity` field: how often (0, 1, or 2 for more).
    identity_fields: u8,
}

impl Report {
    /// Checks the fields the protocol defines: `id` and `client` must be
    /// strings, `seq` a positive integer and `sampled_at_ms` an unsigned
    /// integer, each given at most once. Others are free.
    pub fn from_json_object(object: JsonObject) -> Result<Report, StreamError> {
        let (json, known) = object.into_parts();
        if let Some(field) = known.repeated {
            return Err(StreamError::InvalidField {
                field,
                expected: "given once (the field occurs more than once)",
            });
        }
        for (name, seen) in [
            (FIELD_ID, &known.id),
            (FIELD_CLIENT, &known.client),
            (FIELD_IDENTITY, &known.identity),
        ] {
            if seen.as_ref().is_some_and(|s| !matches!(s, Seen::Str(_))) {
                return Err(StreamError::InvalidField {
                    field: name,
                    expected: "a string",
                });
            }
        }
        let seq = match known.seq {
            None => None,
            Some(Seen::UInt(s)) if s > 0 => Some(s),
            Some(_) => {
                return Err(StreamError::InvalidField {
                    field: FIELD_SEQ,
                    expected: "a positive integer (the first seq is 1)",
                });
            }
        };
        if known
            .sampled_at
            .as_ref()
            .is_some_and(|s| !matches!(s, Seen::UInt(_)))
        {
            return Err(StreamError::InvalidField {
                field: FIELD_SAMPLED_AT,
                expected: "an unsigned integer",
            });
        }
        let client = match known.client {
            Some(Seen::Str(c)) => c,
            _ => None,
        };
        if client.as_ref().is_some_and(|c| c.len() > MAX_CLIENT_BYTES) {
            return Err(StreamError::InvalidField {
                field: FIELD_CLIENT,
                expected: "a string of at most 256 bytes",
            });
        }
        let (identity, identity_fields) = match known.identity {
            Some(Seen::Str(Some(name))) => (
                Identity::from_stored(&name),
                if known.identity_repeated { 2 } else { 1 },
            ),
            _ => (Identity::anonymous(), 0),
        };
        Ok(Report {
            json,
            client,
            seq,
            identity,
            identity_fields,
        })
    }

    /// Binds the report to the identity of the connection that carried it:
    /// a report without an `identity` field gets `"identity":"<name>"` as
    /// its last field (`""` for the anonymous identity); one whose own
    /// field names the same identity is kept as it is; one that names
    /// another, or has the field more than once, is refused
    /// ([`StreamError::Forbidden`]).
    pub fn bind_identity(mut self, identity: &Identity) -> Result<Report, StreamError> {
        match self.identity_fields {
            0 => {
                let end = self.json.pop();
                debug_assert_eq!(end, Some(b'}'), "a report is an object");
                if self.json.len() > 1 {
                    self.json.push(b',');
                }
                self.json.extend_from_slice(b"\"identity\":");
                write_json_str(&mut self.json, identity.as_str());
                self.json.push(b'}');
                self.identity_fields = 1;
                self.identity = identity.clone();
                Ok(self)
            }
            1 if self.identity == *identity => Ok(self),
            n => Err(StreamError::Forbidden {
                claimed: if n > 1 {
                    "(more than one identity field)".into()
                } else {
                    shorten(self.identity.as_str())
                },
                identity: identity.clone(),
            }),
        }
    }

    /// The `(identity, client, seq)` key, when the report carries both
    /// `client` and `seq`.
    pub fn record_key(&self) -> Option<RecordKey> {
        Some(RecordKey {
            identity: self.identity.clone(),
            client: self.client.clone()?,
            seq: self.seq?,
        })
    }

    /// [`Report::from_json_object`] for an object given as a map (tests,
    /// tools; the server parses bytes with [`JsonObject::parse`]).
    pub fn from_object(fields: Map<String, Value>) -> Result<Report, StreamError> {
        let bytes = serde_json::to_vec(&fields).expect("a JSON map always serialises");
        Report::from_json_object(JsonObject::parse(&bytes)?)
    }

    /// `client` and `seq`, when the report carries both (see
    /// [`Report::record_key`] for the key with the identity).
    pub fn key(&self) -> Option<(&str, u64)> {
        Some((self.client.as_deref()?, self.seq?))
    }

    /// The report object's bytes as received (no whitespace between tokens,
    /// no newline).
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// The report as a map (parses its bytes again: not for the hot path).
    pub fn fields(&self) -> Map<String, Value> {
        serde_json::from_slice(&self.json).expect("a report holds a valid object")
    }

    /// The report as one JSON line (with `\n`), as the server's sink writes it.
    pub fn to_json_line(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.json.len() + 1);
        out.extend_from_slice(&self.json);
        out.push(b'\n');
        out
    }
}

/// The server's answer to one report object.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// Recorded (or recorded before, when `duplicate`).
    Ok {
        /// The report had been recorded before; not recorded again.
        duplicate: bool,
        /// The report as the server received it: its JSON text, exactly as
        /// the answer carried it (`null` if the answer had none). Parse it
        /// with [`Response::received_fields`] when you need its fields.
        received: String,
    },
    /// Not recorded.
    Error {
        /// Machine-readable reason (`"invalid_json"`, `"not_recorded"`, ...).
        code: String,
        /// Human-readable reason.
        error: String,
    },
}

/// A response line that is not a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed response: {0}")]
pub struct ResponseError(pub String);

impl Response {
    /// The error response for a stream error.
    pub fn from_stream_error(e: &StreamError) -> Response {
        Response::Error {
            code: e.code().into(),
            error: e.to_string(),
        }
    }

    /// Appends the response and its `\n` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Response::Ok {
                duplicate,
                received,
            } => {
                out.extend_from_slice(if *duplicate {
                    b"{\"ok\":true,\"duplicate\":true,\"received\":"
                } else {
                    b"{\"ok\":true,\"received\":"
                });
                out.extend_from_slice(received.as_bytes());
            }
            Response::Error { code, error } => {
                out.extend_from_slice(b"{\"ok\":false,\"code\":");
                write_json_str(out, code);
                out.extend_from_slice(b",\"error\":");
                write_json_str(out, error);
            }
        }
        out.extend_from_slice(b"}\n");
    }

    /// Parses one response line (trailing whitespace allowed). One typed
    /// pass: the echoed report is kept as text, not built into a map.
    pub fn parse(line: &[u8]) -> Result<Response, ResponseError> {
        if line.iter().copied().find(|b| !is_whitespace(*b)) != Some(b'{') {
            return Err(match serde_json::from_slice::<IgnoredAny>(line) {
                Ok(_) => ResponseError("not a JSON object".into()),
                Err(e) => ResponseError(format!("not JSON: {e}")),
            });
        }
        let mut de = serde_json::Deserializer::from_slice(line);
        let wire = de
            .deserialize_map(WireVisitor)
            .and_then(|w| de.end().map(|()| w))
            .map_err(|e| ResponseError(format!("not JSON: {e}")))?;
        let text = |s: Option<Seen>| match s {
            Some(Seen::Str(Some(t))) => Some(t),
            _ => None,
        };
        match wire.ok {
            Some(Seen::Bool(true)) => Ok(Response::Ok {
                duplicate: wire.duplicate == Some(Seen::Bool(true)),
                received: wire.received.unwrap_or_else(|| "null".into()),
            }),
            Some(Seen::Bool(false)) => Ok(Response::Error {
                code: text(wire.code).unwrap_or_else(|| "unknown".into()),
                error: text(wire.error).unwrap_or_default(),
            }),
            _ => Err(ResponseError("no boolean \"ok\"".into())),
        }
    }

    /// The echoed report's fields, for an `Ok` answer whose `received` is
    /// an object (parses it: not for a hot path).
    pub fn received_fields(&self) -> Option<Map<String, Value>> {
        match self {
            Response::Ok { received, .. } => serde_json::from_str(received).ok(),
            Response::Error { .. } => None,
        }
    }

    /// Whether a client should keep the report and send it again (the server
    /// could not record it) rather than give it up (the report itself is bad).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Response::Error { code, .. } if code == CODE_NOT_RECORDED)
    }
}

/// `s` cut to 64 characters for an error message.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// `s` as a JSON string literal.
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing JSON into a Vec cannot fail");
}

/// The fields of a response line that matter.
#[derive(Default)]
struct Wire {
    ok: Option<Seen>,
    duplicate: Option<Seen>,
    code: Option<Seen>,
    error: Option<Seen>,
    received: Option<String>,
}

/// Visits a response object: `received` is kept as text, the rest noted.
struct WireVisitor;

impl<'de> Visitor<'de> for WireVisitor {
    type Value = Wire;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a response object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Wire, A::Error> {
        let mut w = Wire::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let slot = match key.0.as_ref() {
                "ok" => &mut w.ok,
                "duplicate" => &mut w.duplicate,
                "code" => &mut w.code,
                "error" => &mut w.error,
                "received" => {
                    let raw: &RawValue = map.next_value()?;
                    w.received = Some(raw.get().to_owned());
                    continue;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value_seed(SeenSeed { keep: true })?);
        }
        Ok(w)
    }
}

/// A key, borrowed from the line unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// The JSON kind of a value, for error messages.
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        match serde_json::from_str(s) {
            Ok(Value::Object(m)) => m,
            other => panic!("test input is not an object: {other:?}"),
        }
    }

    #[test]
    fn report_carries_sample_and_our_fields() {
        let s = Sample::from_json(br#"{"value":0.5,"seq":"theirs"}"#, 1234).expect("object");
        let mut out = Vec::new();
        s.encode_report("abcd", "c1", 7, &mut out);
        let r = Report::from_object(obj(std::str::from_utf8(&out).expect("utf8"))).expect("valid");
        assert_eq!(r.key(), Some(("c1", 7)));
        let fields = r.fields();
        assert_eq!(fields["value"], 0.5);
        assert_eq!(fields["id"], "abcd");
        assert_eq!(fields["sampled_at_ms"], 1234);
        assert_eq!(r.json(), &out[..]);
    }

    #[test]
    fn a_client_id_over_256_bytes_is_refused() {
        let at = |n: usize| format!(r#"{{"client":"{}","seq":1}}"#, "c".repeat(n));
        let ok = Report::from_json_object(JsonObject::parse(at(256).as_bytes()).expect("json"))
            .expect("256 bytes is fine");
        assert_eq!(ok.key().map(|(c, _)| c.len()), Some(256));
        let e = Report::from_json_object(JsonObject::parse(at(257).as_bytes()).expect("json"))
            .expect_err("257 bytes");
        assert_eq!(e.code(), "invalid_field");
        assert!(!e.is_fatal(), "the stream carries on");
    }

    #[test]
    fn reports_are_bound_to_the_connection_identity() {
        let alice = Identity::named("alice").expect("name");
        let r = Report::from_object(obj(r#"{"client":"c","seq":1}"#)).expect("valid");
        let r = r.bind_identity(&alice).expect("no identity of its own");
        assert_eq!(r.json(), br#"{"client":"c","seq":1,"identity":"alice"}"#);
        assert_eq!(r.record_key().expect("key").identity, alice);
        let empty = Report::from_object(obj("{}")).expect("valid");
        let anon = empty.bind_identity(&Identity::anonymous()).expect("fine");
        assert_eq!(anon.json(), br#"{"identity":""}"#);
        let same = Report::from_object(obj(r#"{"identity":"alice","v":1}"#)).expect("valid");
        assert_eq!(
            same.bind_identity(&alice).expect("same").json(),
            br#"{"identity":"alice","v":1}"#
        );
        for claim in [
            r#"{"identity":"bob"}"#,
            r#"{"identity":""}"#,
            r#"{"identity":"alice","identity":"bob"}"#,
            r#"{"identity":"alice","identit\u0079":"alice"}"#,
        ] {
            let r = Report::from_json_object(JsonObject::parse(claim.as_bytes()).expect("json"))
                .expect("valid");
            let e = r.bind_identity(&alice).expect_err(claim);
            assert_eq!(e.code(), CODE_FORBIDDEN, "{claim}");
            assert!(!e.is_fatal());
        }
        assert!(matches!(
            Report::from_object(obj(r#"{"identity":5}"#)),
            Err(StreamError::InvalidField {
                field: "identity",
                ..
            })
        ));
    }

    #[test]
    fn a_protocol_field_given_twice_is_refused() {
        // Parsers differ on which copy counts; the file sink's read-back at
        // start must see the key the server deduplicated on.
        for (json, field) in [
            (r#"{"client":"a","seq":1,"client":"b"}"#, "client"),
            (r#"{"client":"a","seq":1,"seq":2}"#, "seq"),
            (r#"{"client":"a","se\u0071":1,"seq":1}"#, "seq"),
            (r#"{"id":"ab","id":"ab","client":"a","seq":1}"#, "id"),
            (r#"{"sampled_at_ms":1,"sampled_at_ms":1}"#, "sampled_at_ms"),
            (r#"{"seq":1,"seq":1,"client":"a","client":"a"}"#, "seq"),
        ] {
            let e = Report::from_json_object(JsonObject::parse(json.as_bytes()).expect("json"))
                .expect_err(json);
            assert_eq!(e.code(), "invalid_field", "{json}");
            assert!(
                matches!(e, StreamError::InvalidField { field: f, .. } if f == field),
                "{json}: {e}"
            );
            assert!(!e.is_fatal(), "the stream carries on");
        }
        let other = r#"{"value":1,"value":2,"client":"a","seq":1}"#;
        let r = Report::from_json_object(JsonObject::parse(other.as_bytes()).expect("json"))
            .expect("other keys may repeat");
        assert_eq!(r.key(), Some(("a", 1)));
        assert_eq!(r.json(), other.as_bytes(), "kept as sent");
    }

    #[test]
    fn sample_must_be_object() {
        assert!(Sample::from_json(b"[1]", 0).is_err());
        assert!(Sample::from_json(b"nope", 0).is_err());
        assert!(Sample::from_json(b"{}", 0).is_ok());
    }

    #[test]
    fn known_fields_are_checked() {
        let e = Report::from_object(obj(r#"{"seq":-1}"#)).expect_err("negative seq");
        assert!(matches!(e, StreamError::InvalidField { field: "seq", .. }));
        let zero = Report::from_object(obj(r#"{"seq":0}"#)).expect_err("seq starts at 1");
        assert!(matches!(
            zero,
            StreamError::InvalidField { field: "seq", .. }
        ));
        assert!(Report::from_object(obj(r#"{"client":5}"#)).is_err());
        assert!(Report::from_object(obj(r#"{"sampled_at_ms":1.5}"#)).is_err());
        let r = Report::from_object(obj(r#"{"value":1}"#)).expect("no known fields is fine");
        assert_eq!(r.key(), None);
    }

    #[test]
    fn responses_round_trip() {
        let cases = [
            Response::Ok {
                duplicate: false,
                received: "1".into(),
            },
            Response::Ok {
                duplicate: true,
                received: r#"{"a":"x"}"#.into(),
            },
            Response::from_stream_error(&StreamError::Truncated),
        ];
        for r in cases {
            let mut line = Vec::new();
            r.encode(&mut line);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(Response::parse(&line).expect("parses"), r);
        }
        let mut line = Vec::new();
        Response::Ok {
            duplicate: false,
            received: "null".into(),
        }
        .encode(&mut line);
        assert_eq!(line, b"{\"ok\":true,\"received\":null}\n");
    }

    #[test]
    fn responses_keep_the_echo_as_sent_and_tolerate_extras() {
        let line = br#"{"extra":[1,{"x":2}],"ok":true,"duplicate":"yes","received": {"seq":3, "value":0.50}}"#;
        let r = Response::parse(line).expect("parses");
        assert_eq!(
            r,
            Response::Ok {
                duplicate: false,
                received: r#"{"seq":3, "value":0.50}"#.into()
            }
        );
        let fields = r.received_fields().expect("an object");
        assert_eq!(fields["seq"], 3);
        let e = Response::parse(br#"{"ok":false,"code":5}"#).expect("parses");
        assert_eq!(
            e,
            Response::Error {
                code: "unknown".into(),
                error: String::new()
            }
        );
        let r = Response::parse(br#"{"ok":true}"#).expect("parses");
        assert!(matches!(r, Response::Ok { ref received, .. } if received == "null"));
    }

    #[test]
    fn reports_are_encoded_without_a_map() {
        let s =
            Sample::from_json(br#"{"value":0.5,"id":"theirs","note":"a\"b"}"#, 9).expect("object");
        let mut out = Vec::new();
        s.encode_report("ab", "c\"1", 2, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).expect("utf8"),
            r#"{"value":0.5,"note":"a\"b","id":"ab","client":"c\"1","seq":2,"sampled_at_ms":9}"#
        );
    }

    #[test]
    fn only_not_recorded_is_retryable() {
        let r = Response::Error {
            code: CODE_NOT_RECORDED.into(),
            error: String::new(),
        };
        assert!(r.is_retryable());
        let unstorable = Response::Error {
            code: CODE_UNSTORABLE.into(),
            error: String::new(),
        };
        assert!(!unstorable.is_retryable(), "a permanent refusal");
        assert!(!Response::from_stream_error(&StreamError::Empty).is_retryable());
        assert!(Response::parse(b"{\"ok\":1}").is_err());
        assert!(Response::parse(b"[1]").is_err());
        assert!(Response::parse(b"{\"ok\":true").is_err());
        assert!(Response::parse(b"garbage").is_err());
    }
}
