//! How much of the table one `/latest` read may take: [`LatestLimit`], a
//! number of clients and a number of bytes, and [`Taking`], which counts a
//! read's rows against it as they come.
//!
//! The byte limit keeps what one read builds (and the answer made of it)
//! under the answer cap of the HTTP side whatever the rows hold: without
//! it, 10,000 clients of 64 KiB reports would be read whole (640 MiB) for
//! an answer the connection's 16 MiB cap then refuses.

/// At most `rows` rows, and only while their bytes stay within `bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatestLimit {
    /// Rows (clients) at most.
    pub rows: usize,
    /// Bytes at most, counted by [`LatestLimit::row_bytes`].
    pub bytes: usize,
}

impl LatestLimit {
    /// At most `rows` rows, of any size (tests, tools).
    pub fn rows(rows: usize) -> LatestLimit {
        LatestLimit {
            rows,
            bytes: usize::MAX,
        }
    }

    /// What one row costs in the answer: the identity and the client as
    /// JSON strings (escapes included: a client id of 256 control
    /// characters is 1,538 bytes written), the body (JSON already) and
    /// the JSON around them (`:`, `,`, an identity's braces).
    pub fn row_bytes(identity: &str, client: &str, body: &[u8]) -> usize {
        json_string_len(identity) + json_string_len(client) + body.len() + 6
    }
}

/// The length of `s` written as a JSON string by `serde_json`, quotes
/// included.
fn json_string_len(s: &str) -> usize {
    2 + s
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if u32::from(c) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

/// One read's rows so far, against its [`LatestLimit`].
#[derive(Debug)]
pub struct Taking {
    limit: LatestLimit,
    rows: usize,
    bytes: usize,
}

impl Taking {
    /// Nothing taken yet.
    pub fn new(limit: LatestLimit) -> Taking {
        Taking {
            limit,
            rows: 0,
            bytes: 0,
        }
    }

    /// Whether the row limit is reached (the read may stop).
    pub fn full(&self) -> bool {
        self.rows >= self.limit.rows
    }

    /// Takes a row of `bytes` ([`LatestLimit::row_bytes`]) if both limits
    /// allow it; `false` once either is reached, and the read stops there
    /// (a row that does not fit is not skipped for a smaller one after it,
    /// so what is shown is a prefix of the key's order).
    pub fn take(&mut self, bytes: usize) -> bool {
        if self.full() || self.bytes.saturating_add(bytes) > self.limit.bytes {
            self.rows = self.limit.rows;
            return false;
        }
        self.rows += 1;
        self.bytes += bytes;
        true
    }

    /// [`Taking::take`] for a row of these strings
    /// ([`LatestLimit::row_bytes`]).
    pub fn take_row(&mut self, identity: &str, client: &str, body: &[u8]) -> bool {
        self.take(LatestLimit::row_bytes(identity, client, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_taken_while_both_limits_allow() {
        let mut t = Taking::new(LatestLimit { rows: 3, bytes: 25 });
        assert!(t.take(10));
        assert!(t.take(10));
        assert!(!t.take(10), "over the bytes");
        assert!(t.full(), "and the read stops there");
        assert!(!t.take(1), "a smaller row after it is not taken");
        let mut t = Taking::new(LatestLimit::rows(2));
        assert!(t.take(usize::MAX / 2) && t.take(usize::MAX / 2));
        assert!(t.full());
        assert!(!t.take(0), "over the rows");
    }

    #[test]
    fn a_row_costs_its_strings_as_written_and_some_json() {
        let json = r#""id":{"client":{"v":1}},"#;
        assert!(LatestLimit::row_bytes("id", "client", br#"{"v":1}"#) >= json.len());
        for s in [
            "",
            "abc",
            "\u{1}\u{1f}",
            "\"\\\n\r\t\u{8}\u{c}",
            "é€😀",
            "\u{7f}\u{85}",
        ] {
            let written = serde_json::to_vec(s).expect("a string").len();
            assert_eq!(json_string_len(s), written, "{s:?}");
        }
        let nasty = "\u{1}".repeat(256);
        assert_eq!(json_string_len(&nasty), 2 + 6 * 256);
    }
}
