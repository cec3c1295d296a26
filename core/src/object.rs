//! One JSON object off a report stream, checked in a single pass and kept as
//! bytes: [`JsonObject`].
//!
//! The server never builds a map of a report. One `serde_json` pass over the
//! object's bytes validates all of it as a full parse would (syntax, UTF-8,
//! escapes, numbers in range, that it is an object) and notes what the five
//! protocol fields (`id`, `client`, `seq`, `sampled_at_ms`, `identity`) hold; every
//! other value is checked ([`Checked`]) without being allocated. The bytes themselves, with any whitespace between tokens
//! removed, are what the sink records and what the answer echoes, so a report
//! is written exactly as it was sent (numbers keep their spelling).
//!
//! Duplicate keys are kept in the bytes as sent. A protocol field that
//! occurs more than once is noted ([`Known::repeated`], and
//! [`Known::identity_repeated`] for `identity`) and the report refused by
//! the checks: parsers differ on which copy counts (the last, the first, or
//! an error), so the server, its sinks and whoever reads the records back
//! could otherwise disagree on a report's key.

use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::StreamError;
use crate::report::{FIELD_CLIENT, FIELD_ID, FIELD_IDENTITY, FIELD_SAMPLED_AT, FIELD_SEQ, kind_of};

/// A complete, valid JSON object: its compact bytes and what its protocol
/// fields hold. Built by [`JsonObject::parse`]; checked into a
/// [`crate::Report`] by [`crate::Report::from_json_object`].
#[derive(Debug, Clone, PartialEq)]
pub struct JsonObject {
    json: Vec<u8>,
    pub(crate) known: Known,
}

/// What one protocol field held, as far as the checks need to know.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seen {
    /// A string (its text, for the fields whose value is kept).
    Str(Option<String>),
    /// An integer that fits in a u64.
    UInt(u64),
    /// `true` or `false`.
    Bool(bool),
    /// Anything else: negative, fractional, null, array, object.
    Other,
}

/// The protocol fields of an object, `None` when absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Known {
    pub(crate) id: Option<Seen>,
    pub(crate) client: Option<Seen>,
    pub(crate) seq: Option<Seen>,
    pub(crate) sampled_at: Option<Seen>,
    pub(crate) identity: Option<Seen>,
    /// `identity` occurs more than once (parsers differ on which counts).
    pub(crate) identity_repeated: bool,
    /// The first of `id`, `client`, `seq`, `sampled_at_ms` found more than
    /// once.
    pub(crate) repeated: Option<&'static str>,
}

/// What a scan of an object's bytes already found out, so that
/// [`JsonObject::parse_hinted`] need not look again. Each flag may be set
/// when unsure (it only costs time), never left clear when true.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Hints {
    /// Whitespace may occur between tokens (the bytes need compacting).
    pub(crate) loose: bool,
}

/// The deepest nesting `serde_json` parses (its recursion limit); the
/// stream splitter refuses anything deeper before parsing it.
pub const MAX_DEPTH: usize = 127;

/// Spare capacity an object's bytes may keep; past it they are shrunk to
/// fit.
const SLACK_KEPT: usize = 64;

impl JsonObject {
    /// Checks that `bytes` are exactly one JSON object (whitespace around it
    /// allowed) and keeps them without whitespace between tokens.
    ///
    /// Errors: [`StreamError::NotUtf8`], [`StreamError::InvalidJson`],
    /// [`StreamError::NotAnObject`] (with the kind of value it is).
    pub fn parse(bytes: &[u8]) -> Result<JsonObject, StreamError> {
        let hints = Hints {
            loose: bytes.iter().any(|b| is_whitespace(*b)),
        };
        JsonObject::parse_hinted(bytes.to_vec(), hints)
    }

    /// [`JsonObject::parse`] for bytes whose scan gave `hints` (the stream
    /// splitter's scanner sees every byte anyway), taking them: bytes that
    /// need no compacting are kept as they are, without a copy.
    pub(crate) fn parse_hinted(bytes: Vec<u8>, hints: Hints) -> Result<JsonObject, StreamError> {
        let known = check(&bytes)?;
        let mut json = if hints.loose { compact(&bytes) } else { bytes };
        // The splitter reserves for the chunk in hand (up to 4 KiB), not for
        // the value: a chunk of many small objects would leave each holding
        // the rest of its reservation for as long as its report waits.
        if json.capacity() - json.len() > SLACK_KEPT {
            json.shrink_to_fit();
        }
        Ok(JsonObject { json, known })
    }

    /// The object's bytes, without whitespace between tokens.
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// The object as a map (parses the bytes again: for tests and tools,
    /// not for the hot path).
    pub fn to_map(&self) -> Map<String, Value> {
        serde_json::from_slice(&self.json).expect("a JsonObject holds a valid object")
    }

    /// Gives up the bytes.
    pub(crate) fn into_parts(self) -> (Vec<u8>, Known) {
        (self.json, self.known)
    }
}

/// The one pass: `bytes` must be exactly one JSON object; what its
/// protocol fields hold.
fn check(bytes: &[u8]) -> Result<Known, StreamError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(StreamError::NotUtf8);
    }
    let first = bytes.iter().copied().find(|b| !is_whitespace(*b));
    if first != Some(b'{') {
        return Err(not_an_object(bytes));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.deserialize_map(ObjectVisitor)
        .and_then(|k| de.end().map(|()| k))
        .map_err(|e| StreamError::InvalidJson(e.to_string()))
}

/// The error for bytes that do not start with `{`: invalid JSON, or the
/// kind of value they are. Off the hot path, so a full parse is fine.
fn not_an_object(bytes: &[u8]) -> StreamError {
    match serde_json::from_slice::<Value>(bytes) {
        Err(e) => StreamError::InvalidJson(e.to_string()),
        Ok(v) => StreamError::NotAnObject(kind_of(&v)),
    }
}

/// JSON whitespace (RFC 8259 `ws`).
pub(crate) fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// `bytes` (valid JSON) without whitespace outside strings.
fn compact(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let (mut in_string, mut escape) = (false, false);
    for &b in bytes {
        if in_string {
            if escape {
                escape = false;
            } else if b == b'\\' {
                escape = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if is_whitespace(b) {
            continue;
        }
        out.push(b);
    }
    out
}

/// Visits the top-level object: notes the protocol fields, skips the rest.
struct ObjectVisitor;

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = Known;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Known, A::Error> {
        let mut known = Known::default();
        while let Some(name) = map.next_key::<FieldName>()? {
            let (slot, field) = match name {
                FieldName::Id => (&mut known.id, FIELD_ID),
                FieldName::Client => (&mut known.client, FIELD_CLIENT),
                FieldName::Seq => (&mut known.seq, FIELD_SEQ),
                FieldName::SampledAt => (&mut known.sampled_at, FIELD_SAMPLED_AT),
                FieldName::Identity => (&mut known.identity, FIELD_IDENTITY),
                FieldName::Other => {
                    map.next_value::<Checked>()?;
                    continue;
                }
            };
            if slot.is_some() {
                // `identity` twice is refused as forbidden, at binding.
                if name == FieldName::Identity {
                    known.identity_repeated = true;
                } else {
                    known.repeated.get_or_insert(field);
                }
            }
            let keep = matches!(name, FieldName::Client | FieldName::Identity);
            *slot = Some(map.next_value_seed(SeenSeed { keep })?);
        }
        Ok(known)
    }
}

/// A top-level key: one of the protocol fields, or any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldName {
    Id,
    Client,
    Seq,
    SampledAt,
    Identity,
    Other,
}

impl<'de> de::Deserialize<'de> for FieldName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FieldName, D::Error> {
        d.deserialize_identifier(FieldNameVisitor)
    }
}

struct FieldNameVisitor;

impl Visitor<'_> for FieldNameVisitor {
    type Value = FieldName;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<FieldName, E> {
        Ok(match v {
            FIELD_ID => FieldName::Id,
            FIELD_CLIENT => FieldName::Client,
            FIELD_SEQ => FieldName::Seq,
            FIELD_SAMPLED_AT => FieldName::SampledAt,
            FIELD_IDENTITY => FieldName::Identity,
            _ => FieldName::Other,
        })
    }
}

/// Reads one field's value into a [`Seen`]; `keep`: copy a string.
pub(crate) struct SeenSeed {
    pub(crate) keep: bool,
}

impl<'de> DeserializeSeed<'de> for SeenSeed {
    type Value = Seen;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Seen, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SeenSeed {
    type Value = Seen;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Seen, E> {
        Ok(Seen::Str(self.keep.then(|| v.to_owned())))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seen, E> {
        Ok(Seen::UInt(v))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Seen, E> {
        Ok(Seen::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Seen, E> {
        Ok(Seen::Other)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Seen, E> {
        Ok(Seen::Bool(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Seen, E> {
        Ok(Seen::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Seen, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Seen::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Seen, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Seen::Other)
    }
}

/// Any JSON value, checked as a full parse checks it (numbers in range,
/// escapes and surrogate pairs in strings) but never built: strings are
/// borrowed, numbers parsed and dropped. (`serde::de::IgnoredAny` would skip
/// `1e999` and `"\ud800"`, which no parser reads back.) Nesting is bounded
/// by `serde_json`'s recursion limit.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Result<JsonObject, StreamError> {
        JsonObject::parse(s.as_bytes())
    }

    #[test]
    fn keeps_the_bytes_without_whitespace_between_tokens() {
        let o = parse(" {\n \"a\" : [1, 2] ,\t\"s\": \"x y\\\" z\" } \r\n").expect("valid");
        assert_eq!(o.json(), br#"{"a":[1,2],"s":"x y\" z"}"#);
        assert_eq!(
            o.to_map(),
            json!({"a":[1,2],"s":"x y\" z"})
                .as_object()
                .cloned()
                .expect("object")
        );
        let o = parse(r#"{"v":1.50,"big":123456789012345678901234567890}"#).expect("valid");
        assert_eq!(
            o.json(),
            br#"{"v":1.50,"big":123456789012345678901234567890}"#
        );
    }

    #[test]
    fn notes_the_protocol_fields() {
        let o = parse(r#"{"id":"ab","client":"c1","seq":7,"sampled_at_ms":-1,"x":{"seq":"no"}}"#)
            .expect("valid");
        assert_eq!(o.known.id, Some(Seen::Str(None)));
        assert_eq!(o.known.client, Some(Seen::Str(Some("c1".into()))));
        assert_eq!(o.known.seq, Some(Seen::UInt(7)));
        assert_eq!(o.known.sampled_at, Some(Seen::Other));
        let o = parse(r#"{"seq":1.0,"client":["c"],"id":null}"#).expect("valid");
        assert_eq!(o.known.seq, Some(Seen::Other));
        assert_eq!(o.known.client, Some(Seen::Other));
        assert_eq!(o.known.id, Some(Seen::Other));
        // An escaped key is the same key; the last duplicate counts.
        let o = parse(r#"{"s\u0065q":3,"seq":4}"#).expect("valid");
        assert_eq!(o.known.seq, Some(Seen::UInt(4)));
    }

    #[test]
    fn refuses_what_is_not_one_object() {
        assert!(matches!(
            parse("[1]"),
            Err(StreamError::NotAnObject("array"))
        ));
        assert!(matches!(
            parse("\"s\""),
            Err(StreamError::NotAnObject("string"))
        ));
        assert!(matches!(
            parse("12"),
            Err(StreamError::NotAnObject("number"))
        ));
        assert!(matches!(
            parse("null"),
            Err(StreamError::NotAnObject("null"))
        ));
        assert!(matches!(parse("[1"), Err(StreamError::InvalidJson(_))));
        assert!(matches!(
            parse("{\"a\":}"),
            Err(StreamError::InvalidJson(_))
        ));
        assert!(matches!(
            parse("{\"a\":1}x"),
            Err(StreamError::InvalidJson(_))
        ));
        assert!(matches!(
            parse("{\"a\":tru}"),
            Err(StreamError::InvalidJson(_))
        ));
        assert!(matches!(
            parse("{\"a\":\"\\q\"}"),
            Err(StreamError::InvalidJson(_))
        ));
        assert!(matches!(
            parse("{\"a\":[1,{\"b\":}]}"),
            Err(StreamError::InvalidJson(_))
        ));
        assert!(matches!(
            parse(r#"{"a":"\ud800"}"#),
            Err(StreamError::InvalidJson(_))
        ));
        assert!(matches!(
            parse(r#"{"\udc00":1}"#),
            Err(StreamError::InvalidJson(_))
        ));
        assert!(matches!(
            JsonObject::parse(b"{\"a\":\"\xff\"}"),
            Err(StreamError::NotUtf8)
        ));
    }

    #[test]
    fn agrees_with_a_full_parse() {
        for s in [
            r#"{}"#,
            r#"{"a":{"b":[1,{"c":"}{]["}]},"q":"say \"hi\" \\"}"#,
            r#"{"n":-1.5e3,"t":true,"f":false,"u":null,"e":"","z":"\u007b\u00e9\ud83d\ude00"}"#,
        ] {
            let want: Map<String, Value> = serde_json::from_str(s).expect("test input");
            assert_eq!(parse(s).expect("valid").to_map(), want, "{s}");
        }
    }
}
