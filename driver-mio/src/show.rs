//! How the core's events read as text: one line per event, and how much it
//! matters ([`Shown`]). The server loop's log, the `client` command's
//! output, the demo and the bench all print these lines, so an event reads
//! the same wherever it shows up.

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use quic_report_core::{
    ClientEvent, ClientStats, ConnKey, DisconnectReason, Report, Response, ServerEvent,
};

/// An event's line and its importance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shown {
    /// An acknowledged report (the client's stdout line).
    Ack(String),
    /// Something to log at info.
    Info(String),
    /// Something to log as a warning.
    Warn(String),
    /// Only for debug logs.
    Debug(String),
}

impl Shown {
    /// The line, whatever its importance.
    pub fn text(&self) -> &str {
        match self {
            Shown::Ack(s) | Shown::Info(s) | Shown::Warn(s) | Shown::Debug(s) => s,
        }
    }

    /// Logs the line at its level (an acknowledgement at info).
    pub fn log(&self) {
        match self {
            Shown::Ack(s) | Shown::Info(s) => log::info!("{s}"),
            Shown::Warn(s) => log::warn!("{s}"),
            Shown::Debug(s) => log::debug!("{s}"),
        }
    }
}

/// The line of a client event; `stats` are the client's counters (the line
/// per connection counts resumed and 0-RTT connections).
pub fn client_event(ev: &ClientEvent, stats: &ClientStats) -> Shown {
    match ev {
        ClientEvent::Connecting { attempt } => {
            Shown::Debug(format!("connecting (attempt {attempt})"))
        }
        ClientEvent::Connected {
            conn_id,
            resumed,
            early_data,
        } => Shown::Info(format!(
            "connected, id {conn_id}, resumed={resumed} 0-rtt={early_data} \
             ({} of {} connection(s) resumed, 0-RTT accepted on {})",
            stats.resumed, stats.connections, stats.early_data_accepted
        )),
        ClientEvent::Acknowledged {
            seq,
            duplicate,
            response,
        } => {
            let mut s = format!("ack seq={seq}");
            if let Response::Ok { received, .. } = response {
                s.push_str(&Value(received.as_bytes()).to_string());
            }
            if *duplicate {
                s.push_str(" (duplicate)");
            }
            Shown::Ack(s)
        }
        ClientEvent::SeqReused { seq } => Shown::Warn(format!(
            "report seq={seq} is lost: the server had this seq before it was first sent \
             (another client uses this client id, or its numbering started over without its \
             spool)"
        )),
        ClientEvent::Rejected { seq, code, reason } => Shown::Warn(format!(
            "report seq={seq} rejected by the server ({code}): {reason}"
        )),
        ClientEvent::Retrying { seq, reason } => {
            Shown::Info(format!("report seq={seq} will be sent again: {reason}"))
        }
        // Retried, but nothing gets through until a person or NTP acts.
        ClientEvent::Disconnected {
            reason:
                reason @ (DisconnectReason::CertificateOutOfDate(_)
                | DisconnectReason::ClientCertificateOutOfDate(_)),
        } => Shown::Warn(format!("disconnected: {reason}")),
        ClientEvent::Disconnected { reason } => Shown::Info(format!("disconnected: {reason}")),
        ClientEvent::ReconnectScheduled { at, attempt } => {
            let ms = at.saturating_duration_since(Instant::now()).as_millis();
            Shown::Info(format!("reconnecting in {ms} ms (attempt {attempt})"))
        }
        ClientEvent::ReportDropped { seq } => {
            Shown::Warn(format!("queue full: report seq={seq} dropped"))
        }
        ClientEvent::Closed => Shown::Info("closed".into()),
        // The driver returns it as an error, which main prints.
        ClientEvent::Failed { reason } => Shown::Debug(format!("failed: {reason}")),
        other => Shown::Debug(format!("{other:?}")),
    }
}

/// Client lines with each outage said once (and reports lost to a reused
/// seq: the first, then every hundredth). An outage runs from a failure to
/// the next answer from the server, whatever it says (a connection that
/// is closed before answering does not end it: a server that takes the
/// handshake and closes at once is one outage). In it, each reason is
/// shown once at its level, and again only at debug; the first
/// "reconnecting" after a new reason and the first connection are shown,
/// later ones at debug; the first connection says how many attempts it
/// took. Likewise a report to be sent again (the server could not record
/// it) is shown once per reason until a report is acknowledged. A device
/// that boots without a network, or whose server or database is gone for
/// hours, logs a few lines per outage, not two or three per attempt or
/// one per report; the client's summary line still says every 10 s that
/// it is waiting.
///
/// The acknowledgement of a report lost to a reused seq says so:
/// `(duplicate) (lost: the seq was used before)`.
#[derive(Debug, Default)]
pub struct ClientLog {
    // Reasons come from the server (its close reason, its answers): at
    // most MAX_REASONS of each kind are remembered and shown, the rest
    // only at debug.
    outage: Option<Outage>,
    /// Reports lost to a reused seq so far.
    reused: u64,
    /// The seq of the last such report (its acknowledgement comes next).
    reused_seq: Option<u64>,
    /// The current attempt connected.
    up: bool,
    /// The reasons of "sent again" lines shown since the last
    /// acknowledgement.
    retry_reasons: Vec<String>,
}

/// Most distinct reasons a [`ClientLog`] shows in one outage (and "sent
/// again" reasons between acknowledgements).
const MAX_REASONS: usize = 16;

/// Whether `reason` is new to `seen` (and room is left to remember it,
/// [`MAX_REASONS`]); remembers it if so.
fn first_time(seen: &mut Vec<String>, reason: &str) -> bool {
    if seen.len() >= MAX_REASONS || seen.iter().any(|r| r == reason) {
        return false;
    }
    seen.push(reason.to_owned());
    true
}

#[derive(Debug, Default)]
struct Outage {
    /// The first attempt it counts: the one that failed, or the one after
    /// a connection that was lost.
    first_attempt: u32,
    /// The reasons shown in it.
    reasons: Vec<String>,
    /// A "reconnecting" line was shown since the last new reason.
    scheduled_shown: bool,
    /// A connection was shown in it.
    connected_shown: bool,
}

impl ClientLog {
    /// The line of `ev` ([`client_event`]), at debug when it repeats the
    /// outage.
    pub fn line(&mut self, ev: &ClientEvent, stats: &ClientStats) -> Shown {
        let shown = client_event(ev, stats);
        let quiet = |shown: Shown| match shown {
            Shown::Info(s) | Shown::Warn(s) => Shown::Debug(s),
            other => other,
        };
        match ev {
            ClientEvent::Disconnected { reason } => {
                let reason = reason.to_string();
                let first_attempt = stats.attempts + u32::from(self.up);
                self.up = false;
                let o = self.outage.get_or_insert_with(|| Outage {
                    first_attempt,
                    ..Outage::default()
                });
                if first_time(&mut o.reasons, &reason) {
                    o.scheduled_shown = false;
                    shown
                } else {
                    quiet(shown)
                }
            }
            ClientEvent::ReconnectScheduled { .. } => match &mut self.outage {
                Some(o) if o.scheduled_shown => quiet(shown),
                Some(o) => {
                    o.scheduled_shown = true;
                    shown
                }
                None => shown,
            },
            // Each is a lost report, but a numbering that started over loses
            // one per sample until it passes the old one: the first, then
            // every hundredth with the count.
            ClientEvent::SeqReused { seq } => {
                self.reused += 1;
                self.reused_seq = Some(*seq);
                match shown {
                    Shown::Warn(s) if self.reused == 1 => Shown::Warn(s),
                    Shown::Warn(s) if self.reused.is_multiple_of(100) => {
                        Shown::Warn(format!("{s} ({} so far)", self.reused))
                    }
                    Shown::Warn(s) => Shown::Debug(s),
                    other => other,
                }
            }
            ClientEvent::Connected { .. } => {
                self.up = true;
                match (&mut self.outage, shown) {
                    (Some(o), shown) if o.connected_shown => quiet(shown),
                    (Some(o), Shown::Info(s)) => {
                        o.connected_shown = true;
                        let attempts = (stats.attempts + 1).saturating_sub(o.first_attempt);
                        if attempts > 1 {
                            Shown::Info(format!("{s}, after {attempts} attempts"))
                        } else {
                            Shown::Info(s)
                        }
                    }
                    (_, shown) => shown,
                }
            }
            ClientEvent::Retrying { reason, .. } => {
                self.outage = None;
                if first_time(&mut self.retry_reasons, reason) {
                    shown
                } else {
                    quiet(shown)
                }
            }
            ClientEvent::Acknowledged { seq, .. } => {
                self.outage = None;
                self.retry_reasons.clear();
                match shown {
                    Shown::Ack(s) if self.reused_seq.take() == Some(*seq) => {
                        Shown::Ack(s + " (lost: the seq was used before)")
                    }
                    shown => shown,
                }
            }
            ClientEvent::Rejected { .. } => {
                self.outage = None;
                shown
            }
            _ => shown,
        }
    }
}

#[cfg(test)]
mod client_log_tests {
    use super::*;

    /// Feeds the client's events to one [`ClientLog`] and keeps each line's
    /// level.
    struct Run {
        log: ClientLog,
        stats: ClientStats,
        levels: Vec<&'static str>,
    }

    impl Run {
        fn new() -> Run {
            Run {
                log: ClientLog::default(),
                stats: ClientStats::default(),
                levels: Vec::new(),
            }
        }

        /// `ev`'s line; its level is pushed onto `levels`.
        fn at(&mut self, ev: ClientEvent) -> String {
            let shown = self.log.line(&ev, &self.stats);
            self.levels.push(match &shown {
                Shown::Debug(_) => "debug",
                Shown::Warn(_) => "warn",
                _ => "info",
            });
            shown.text().to_owned()
        }

        /// An attempt that fails for `reason`, and the next one scheduled.
        fn failed(&mut self, reason: DisconnectReason) {
            self.connecting();
            self.at(ClientEvent::Disconnected { reason });
            self.at(ClientEvent::ReconnectScheduled {
                at: Instant::now(),
                attempt: self.stats.attempts + 1,
            });
        }

        fn connecting(&mut self) {
            self.stats.attempts += 1;
            let attempt = self.stats.attempts;
            self.at(ClientEvent::Connecting { attempt });
        }

        fn connected(&mut self) -> String {
            self.at(ClientEvent::Connected {
                conn_id: "ab".into(),
                resumed: false,
                early_data: false,
            })
        }

        fn answered(&mut self) {
            self.at(ClientEvent::Acknowledged {
                seq: 1,
                duplicate: false,
                response: Response::Ok {
                    duplicate: false,
                    received: "null".into(),
                },
            });
        }

        /// The levels logged since `from`, other than debug.
        fn shown_since(&self, from: usize) -> Vec<&'static str> {
            self.levels[from..]
                .iter()
                .copied()
                .filter(|l| *l != "debug")
                .collect()
        }
    }

    fn peer_closed() -> DisconnectReason {
        DisconnectReason::PeerClosed {
            code: 0,
            app: true,
            reason: "go away".into(),
        }
    }

    /// An outage of many attempts for one reason: its first failure and
    /// first "reconnecting" at info, the rest at debug, and the connection
    /// that ends it says how many attempts it took. After an answer, a new
    /// outage is shown again.
    #[test]
    fn an_outage_is_said_once() {
        let mut run = Run::new();
        for _ in 0..5 {
            run.failed(DisconnectReason::Unreachable);
        }
        run.connecting();
        let line = run.connected();
        assert!(line.ends_with(", after 6 attempts"), "{line}");
        assert_eq!(run.shown_since(0), ["info"; 3], "{:?}", run.levels);
        run.answered();
        // Connected again at the first attempt of the next outage: plain.
        let from = run.levels.len();
        run.at(ClientEvent::Disconnected {
            reason: DisconnectReason::IdleTimeout,
        });
        run.connecting();
        let line = run.connected();
        assert!(!line.contains("after"), "{line}");
        assert_eq!(run.shown_since(from), ["info"; 2], "{:?}", run.levels);
    }

    /// A server that takes the handshake and closes before answering, and
    /// a reason that alternates with another: still one outage, each reason
    /// and the first connection shown once, until the first answer.
    #[test]
    fn connections_that_close_before_answering_are_one_outage() {
        let mut run = Run::new();
        run.connecting();
        run.connected();
        run.answered();
        let from = run.levels.len();
        for i in 0..6 {
            run.at(ClientEvent::Disconnected {
                reason: peer_closed(),
            });
            run.at(ClientEvent::ReconnectScheduled {
                at: Instant::now(),
                attempt: run.stats.attempts + 1,
            });
            if i % 2 == 1 {
                run.failed(DisconnectReason::Unreachable);
            }
            run.connecting();
            let line = run.connected();
            if i == 0 {
                // The lost connection's own attempt is not counted.
                assert!(!line.contains("after"), "{line}");
            }
        }
        // peer closed, reconnecting, connected; unreachable, reconnecting.
        assert_eq!(run.shown_since(from), ["info"; 5], "{:?}", run.levels);
        run.answered();
        let from = run.levels.len();
        run.at(ClientEvent::Disconnected {
            reason: peer_closed(),
        });
        assert_eq!(run.shown_since(from), ["info"], "a new outage");
    }

    /// A server that answers every report `not_recorded` (its database
    /// down): one line per reason until a report is acknowledged, not one
    /// per report.
    #[test]
    fn reports_sent_again_are_said_once_per_reason() {
        let mut run = Run::new();
        run.connecting();
        run.connected();
        let retry = |seq| ClientEvent::Retrying {
            seq,
            reason: "not_recorded: the database is down".into(),
        };
        for seq in 1..=50 {
            run.at(retry(seq));
        }
        run.at(ClientEvent::Retrying {
            seq: 1,
            reason: "stream reset by the server".into(),
        });
        // connected, the first not_recorded, the reset.
        assert_eq!(run.shown_since(0), ["info"; 3], "{:?}", run.levels);
        run.answered();
        let from = run.levels.len();
        run.at(retry(2));
        assert_eq!(run.shown_since(from), ["info"], "after an ack, said again");
    }

    /// The acknowledgement of a report lost to a reused seq says it is lost.
    #[test]
    fn the_ack_of_a_lost_report_says_so() {
        let mut run = Run::new();
        let ack = |seq| ClientEvent::Acknowledged {
            seq,
            duplicate: true,
            response: Response::Ok {
                duplicate: true,
                received: "null".into(),
            },
        };
        run.at(ClientEvent::SeqReused { seq: 3 });
        let lost = run.at(ack(3));
        assert!(
            lost.ends_with(" (duplicate) (lost: the seq was used before)"),
            "{lost}"
        );
        let resent = run.at(ack(4));
        assert!(resent.ends_with(" (duplicate)"), "{resent}");
    }

    /// A reason logged as a warning is not repeated either.
    #[test]
    fn a_warning_repeated_in_an_outage_is_quieted() {
        let mut run = Run::new();
        for _ in 0..4 {
            run.failed(DisconnectReason::CertificateOutOfDate("expired".into()));
        }
        assert_eq!(run.shown_since(0), ["warn", "info"], "{:?}", run.levels);
    }
}

/// The line of a server event. A report is shown when it is answered
/// ([`Recorded`]); its event alone is only for debug logs.
pub fn server_event(ev: &ServerEvent) -> Shown {
    match ev {
        ServerEvent::ConnectionOpened {
            conn,
            peer,
            resumed,
            identity,
            handshake,
        } => {
            let resumed = if *resumed { ", resumed session" } else { "" };
            Shown::Info(format!(
                "{conn}: connection opened from {peer} by {identity} (handshake {:.1}ms{resumed})",
                handshake.as_secs_f64() * 1e3
            ))
        }
        ServerEvent::Report {
            handle,
            peer,
            report,
        } => Shown::Debug(format!(
            "{}: {} from {peer}",
            handle.conn,
            ReportText(report)
        )),
        ServerEvent::Duplicate { conn, key } => Shown::Info(format!(
            "{conn}: duplicate report {key} (not recorded again)"
        )),
        // A peer can cause these as often as it likes: the server loop logs
        // them rate-limited (see its `log_refusal`).
        ServerEvent::HandshakeRefused { conn, peer, reason } => {
            Shown::Debug(format!("{conn}: handshake from {peer} refused: {reason}"))
        }
        ServerEvent::StreamRejected {
            conn,
            error: error @ quic_report_core::StreamError::Forbidden { .. },
            ..
        } => Shown::Debug(format!("{conn}: report refused: {error}")),
        ServerEvent::StreamRejected {
            conn,
            stream,
            error,
        } => Shown::Info(format!("{conn}: stream {stream} rejected: {error}")),
        ServerEvent::ConnectionClosed {
            conn,
            peer,
            established,
            reason,
            stats,
        } => {
            let rtt = stats
                .rtt
                .map(|r| format!("{r:?}"))
                .unwrap_or_else(|| "-".into());
            let what = if *established {
                "connection"
            } else {
                "handshake"
            };
            Shown::Info(format!(
                "{conn}: {what} from {peer} closed: {reason}; reports={} packets sent={} recv={} lost={} bytes sent={} recv={} rtt={rtt}",
                stats.reports,
                stats.sent,
                stats.recv,
                stats.lost,
                stats.sent_bytes,
                stats.recv_bytes,
            ))
        }
        ServerEvent::Request {
            handle,
            peer,
            path,
            identity,
        } => Shown::Info(format!(
            "{}: GET {} from {peer} by {identity}",
            handle.conn,
            FromPeer(path)
        )),
        other => Shown::Debug(format!("server event: {other:?}")),
    }
}

/// `C: recorded report client=.. seq=.. value=.. from PEER`: the line of a
/// report once it is recorded.
#[derive(Debug, Clone, Copy)]
pub struct Recorded<'a> {
    /// Its connection.
    pub conn: ConnKey,
    /// The report.
    pub report: &'a Report,
    /// The client's address.
    pub peer: SocketAddr,
}

impl fmt::Display for Recorded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: recorded {} from {}",
            self.conn,
            ReportText(self.report),
            self.peer
        )
    }
}

/// `report client=.. seq=.. value=..`, written straight into the line (no
/// string built when a log line is not logged, and only the `value` field
/// parsed when it is).
#[derive(Debug, Clone, Copy)]
pub struct ReportText<'a>(pub &'a Report);

impl fmt::Display for ReportText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        f.write_str("report")?;
        if !r.identity.is_anonymous() {
            write!(f, " identity={}", r.identity)?;
        }
        if let Some(c) = &r.client {
            write!(f, " client={}", FromPeer(c))?;
        }
        if let Some(seq) = r.seq {
            write!(f, " seq={seq}")?;
        }
        write!(f, "{}", Value(r.json()))
    }
}

/// A string a peer chose (a `client` id, a request's path), shown so that
/// it cannot forge or garble a log line: as it is when it is printable
/// ASCII without spaces and at most [`FromPeer::MAX`] bytes (hex ids,
/// paths), else quoted and escaped as Rust's `{:?}` does, cut to
/// [`FromPeer::MAX`] characters with `...` after the quote.
#[derive(Debug, Clone, Copy)]
pub struct FromPeer<'a>(pub &'a str);

impl FromPeer<'_> {
    /// The longest string shown whole.
    pub const MAX: usize = 128;
}

impl fmt::Display for FromPeer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.len() <= Self::MAX && !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()) {
            return f.write_str(s);
        }
        match s.char_indices().nth(Self::MAX) {
            Some((cut, _)) => write!(f, "{:?}...", &s[..cut]),
            None => write!(f, "{s:?}"),
        }
    }
}

/// ` value=..` of a JSON object's `value` field (a float to 4 decimals,
/// anything else as sent, through [`FromPeer`]), or nothing if it has none.
#[derive(Debug, Clone, Copy)]
pub struct Value<'a>(pub &'a [u8]);

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// The one field shown, as it was sent.
        #[derive(serde::Deserialize)]
        struct Field<'a> {
            #[serde(borrow)]
            value: Option<&'a serde_json::value::RawValue>,
        }
        let Ok(Field { value: Some(v) }) = serde_json::from_slice::<Field>(self.0) else {
            return Ok(());
        };
        let raw = v.get();
        let float = raw.contains(['.', 'e', 'E']);
        match raw.parse::<f64>() {
            Ok(x) if float => write!(f, " value={x:.4}"),
            _ => write!(f, " value={}", FromPeer(raw)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{FromPeer, Value};

    #[test]
    fn value_shows_floats_to_four_decimals_and_the_rest_as_sent() {
        let v = |json: &str| Value(json.as_bytes()).to_string();
        assert_eq!(v(r#"{"value":0.56412345}"#), " value=0.5641");
        assert_eq!(v(r#"{"value":1e-3}"#), " value=0.0010");
        assert_eq!(v(r#"{"seq":1,"value":42}"#), " value=42");
        assert_eq!(v(r#"{"value":"up"}"#), r#" value="up""#);
        assert_eq!(v(r#"{"other":1}"#), "");
        assert_eq!(v("not json"), "");
        let long = format!(r#"{{"value":[{}0]}}"#, "0,".repeat(1000));
        assert!(v(&long).len() < 150, "cut: {}", v(&long));
        assert_eq!(v("{\"value\":\"a\u{9b}b\"}"), r#" value="\"a\u{9b}b\"""#);
    }

    #[test]
    fn what_a_peer_chose_cannot_forge_a_log_line() {
        let s = |x: &str| FromPeer(x).to_string();
        assert_eq!(s("0123abcd"), "0123abcd");
        assert_eq!(s("/latest"), "/latest");
        assert_eq!(s("a\r\nINFO forged"), r#""a\r\nINFO forged""#);
        assert_eq!(s("\u{1b}[2J"), r#""\u{1b}[2J""#);
        assert_eq!(s(""), r#""""#);
        assert_eq!(s(&"x".repeat(128)), "x".repeat(128));
        let cut = s(&"x".repeat(4096));
        assert_eq!(cut, format!("\"{}\"...", "x".repeat(128)));
        assert!(!s("é\u{85}").contains('\u{85}'), "C1 controls escaped");
    }
}
