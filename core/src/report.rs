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

/// Field: hex of the source connection ID of the connection that carried it.
pub const FIELD_ID: &str = "id";
/// Field: random hex naming the client process; with `seq`, the dedup key.
pub const FIELD_CLIENT: &str = "client";
/// Field: the report's sequence number, increasing per client.
pub const FIELD_SEQ: &str = "seq";
/// Field: unix milliseconds when the value was fetched.
pub const FIELD_SAMPLED_AT: &str = "sampled_at_ms";

/// Response code for a report the server could not record (e.g. its sink
/// failed). The only error a client should retry.
pub const CODE_NOT_RECORDED: &str = "not_recorded";

/// A value fetched from the source: its JSON object and when it was taken.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The source's JSON object (e.g. `{"value": 0.42}`).
    pub fields: Map<String, Value>,
    /// Unix milliseconds when the value was fetched (the caller's wall clock).
    pub sampled_at_ms: u64,
}

/// A source answered something that is not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleError(pub String);

impl fmt::Display for SampleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SampleError {}

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

    /// Writes the report object for this sample: the source's fields plus
    /// `id`, `client`, `seq` and `sampled_at_ms` (ours win over the source's).
    pub fn encode_report(&self, conn_id: &str, client: &str, seq: u64, out: &mut Vec<u8>) {
        let mut obj = self.fields.clone();
        obj.insert(FIELD_ID.into(), Value::from(conn_id));
        obj.insert(FIELD_CLIENT.into(), Value::from(client));
        obj.insert(FIELD_SEQ.into(), Value::from(seq));
        obj.insert(FIELD_SAMPLED_AT.into(), Value::from(self.sampled_at_ms));
        serde_json::to_writer(out, &obj).expect("writing JSON into a Vec cannot fail");
    }
}

/// A report as the server received it: the whole object, with the fields the
/// protocol defines checked and pulled out.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The object as received.
    pub fields: Map<String, Value>,
    /// `client`, when present.
    pub client: Option<String>,
    /// `seq`, when present.
    pub seq: Option<u64>,
}

impl Report {
    /// Checks the fields the protocol defines: `id` and `client` must be
    /// strings, `seq` and `sampled_at_ms` unsigned integers. Others are free.
    pub fn from_object(fields: Map<String, Value>) -> Result<Report, StreamError> {
        for name in [FIELD_ID, FIELD_CLIENT] {
            if let Some(v) = fields.get(name)
                && !v.is_string()
            {
                return Err(StreamError::InvalidField {
                    field: name,
                    expected: "a string",
                });
            }
        }
        if let Some(v) = fields.get(FIELD_SEQ)
            && v.as_u64().is_none_or(|s| s == 0)
        {
            return Err(StreamError::InvalidField {
                field: FIELD_SEQ,
                expected: "a positive integer (the first seq is 1)",
            });
        }
        if let Some(v) = fields.get(FIELD_SAMPLED_AT)
            && !v.is_u64()
        {
            return Err(StreamError::InvalidField {
                field: FIELD_SAMPLED_AT,
                expected: "an unsigned integer",
            });
        }
        let client = fields
            .get(FIELD_CLIENT)
            .and_then(Value::as_str)
            .map(str::to_owned);
        let seq = fields.get(FIELD_SEQ).and_then(Value::as_u64);
        Ok(Report {
            fields,
            client,
            seq,
        })
    }

    /// The dedup key, when the report carries both `client` and `seq`.
    pub fn key(&self) -> Option<(&str, u64)> {
        Some((self.client.as_deref()?, self.seq?))
    }

    /// The report as one JSON line (with `\n`), as the server's sink writes it.
    pub fn to_json_line(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(&self.fields).expect("a JSON map always serialises");
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
        /// The report as the server received it.
        received: Value,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseError(pub String);

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed response: {}", self.0)
    }
}

impl std::error::Error for ResponseError {}

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
        let mut obj = Map::new();
        match self {
            Response::Ok {
                duplicate,
                received,
            } => {
                obj.insert("ok".into(), Value::Bool(true));
                if *duplicate {
                    obj.insert("duplicate".into(), Value::Bool(true));
                }
                obj.insert("received".into(), received.clone());
            }
            Response::Error { code, error } => {
                obj.insert("ok".into(), Value::Bool(false));
                obj.insert("code".into(), Value::from(code.as_str()));
                obj.insert("error".into(), Value::from(error.as_str()));
            }
        }
        serde_json::to_writer(&mut *out, &obj).expect("writing JSON into a Vec cannot fail");
        out.push(b'\n');
    }

    /// Parses one response line (trailing whitespace allowed).
    pub fn parse(line: &[u8]) -> Result<Response, ResponseError> {
        let v: Value =
            serde_json::from_slice(line).map_err(|e| ResponseError(format!("not JSON: {e}")))?;
        let Value::Object(mut obj) = v else {
            return Err(ResponseError("not a JSON object".into()));
        };
        match obj.get("ok") {
            Some(Value::Bool(true)) => Ok(Response::Ok {
                duplicate: obj
                    .get("duplicate")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                received: obj.remove("received").unwrap_or(Value::Null),
            }),
            Some(Value::Bool(false)) => Ok(Response::Error {
                code: obj
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_owned(),
                error: obj
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            }),
            _ => Err(ResponseError("no boolean \"ok\"".into())),
        }
    }

    /// Whether a client should keep the report and send it again (the server
    /// could not record it) rather than give it up (the report itself is bad).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Response::Error { code, .. } if code == CODE_NOT_RECORDED)
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
        assert_eq!(r.fields["value"], 0.5);
        assert_eq!(r.fields["id"], "abcd");
        assert_eq!(r.fields["sampled_at_ms"], 1234);
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
                received: Value::from(1),
            },
            Response::Ok {
                duplicate: true,
                received: Value::from("x"),
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
            received: Value::Null,
        }
        .encode(&mut line);
        assert_eq!(line, b"{\"ok\":true,\"received\":null}\n");
    }

    #[test]
    fn only_not_recorded_is_retryable() {
        let r = Response::Error {
            code: CODE_NOT_RECORDED.into(),
            error: String::new(),
        };
        assert!(r.is_retryable());
        assert!(!Response::from_stream_error(&StreamError::Empty).is_retryable());
        assert!(Response::parse(b"{\"ok\":1}").is_err());
        assert!(Response::parse(b"garbage").is_err());
    }
}
