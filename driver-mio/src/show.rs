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
            reason: reason @ DisconnectReason::CertificateOutOfDate(_),
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
/// seq: the first, then every hundredth): the first failed attempt of a
/// run of failures is shown at its level, the same reason again and every
/// "reconnecting" after the first at debug, until a connection is made,
/// whose line then says how many attempts it took. A device that boots
/// without a network, or whose server is gone for hours, logs a line per
/// outage (and per change of reason), not two per attempt; the client's
/// summary line still says every 10 s that it is waiting.
#[derive(Debug, Default)]
pub struct ClientLog {
    outage: Option<Outage>,
    /// Reports lost to a reused seq so far.
    reused: u64,
    /// The client's attempts when it last connected.
    attempts_then: u32,
}

#[derive(Debug)]
struct Outage {
    /// The last reason shown.
    reason: String,
    /// A "reconnecting" line was shown in it.
    scheduled_shown: bool,
}

impl ClientLog {
    /// The line of `ev` ([`client_event`]), at debug when it repeats the
    /// outage.
    pub fn line(&mut self, ev: &ClientEvent, stats: &ClientStats) -> Shown {
        let shown = client_event(ev, stats);
        let quiet = |shown: Shown| match shown {
            Shown::Info(s) => Shown::Debug(s),
            other => other,
        };
        match ev {
            ClientEvent::Disconnected { reason } => {
                let reason = reason.to_string();
                match &mut self.outage {
                    Some(o) if o.reason == reason => quiet(shown),
                    Some(o) => {
                        o.reason = reason;
                        o.scheduled_shown = false;
                        shown
                    }
                    None => {
                        self.outage = Some(Outage {
                            reason,
                            scheduled_shown: false,
                        });
                        shown
                    }
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
            ClientEvent::SeqReused { .. } => {
                self.reused += 1;
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
                let attempts = stats.attempts.saturating_sub(self.attempts_then);
                self.attempts_then = stats.attempts;
                match (self.outage.take(), shown) {
                    (Some(_), Shown::Info(s)) if attempts > 1 => {
                        Shown::Info(format!("{s}, after {attempts} attempts"))
                    }
                    (_, shown) => shown,
                }
            }
            _ => shown,
        }
    }
}

#[cfg(test)]
mod client_log_tests {
    use super::*;

    /// `ev`'s line, its level pushed onto `levels`.
    fn at(
        log: &mut ClientLog,
        levels: &mut Vec<&'static str>,
        ev: ClientEvent,
        stats: &ClientStats,
    ) -> String {
        let shown = log.line(&ev, stats);
        levels.push(match &shown {
            Shown::Debug(_) => "debug",
            _ => "info",
        });
        shown.text().to_owned()
    }

    /// An outage of many attempts for one reason: its first failure and
    /// first "reconnecting" at info, the rest at debug, and the connection
    /// that ends it says how many attempts it took. A new outage is shown
    /// again.
    #[test]
    fn an_outage_is_said_once() {
        let mut log = ClientLog::default();
        let mut stats = ClientStats::default();
        let mut levels = Vec::new();
        let later = Instant::now();
        for attempt in 1..=5 {
            stats.attempts = attempt;
            at(
                &mut log,
                &mut levels,
                ClientEvent::Connecting { attempt },
                &stats,
            );
            at(
                &mut log,
                &mut levels,
                ClientEvent::Disconnected {
                    reason: DisconnectReason::Unreachable,
                },
                &stats,
            );
            at(
                &mut log,
                &mut levels,
                ClientEvent::ReconnectScheduled {
                    at: later,
                    attempt: attempt + 1,
                },
                &stats,
            );
        }
        stats.attempts = 6;
        at(
            &mut log,
            &mut levels,
            ClientEvent::Connecting { attempt: 6 },
            &stats,
        );
        let connected = ClientEvent::Connected {
            conn_id: "ab".into(),
            resumed: false,
            early_data: false,
        };
        let line = at(&mut log, &mut levels, connected.clone(), &stats);
        assert!(line.ends_with(", after 6 attempts"), "{line}");
        let shown: Vec<_> = levels.iter().filter(|l| **l == "info").collect();
        assert_eq!(shown.len(), 3, "{levels:?}");
        // Connected again at the first attempt of the next outage: plain.
        let idle = ClientEvent::Disconnected {
            reason: DisconnectReason::IdleTimeout,
        };
        at(&mut log, &mut levels, idle, &stats);
        assert_eq!(levels.last(), Some(&"info"));
        stats.attempts = 7;
        let line = at(&mut log, &mut levels, connected, &stats);
        assert!(!line.contains("after"), "{line}");
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
            "{}: GET {path} from {peer} by {identity}",
            handle.conn
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
            write!(f, " client={c}")?;
        }
        if let Some(seq) = r.seq {
            write!(f, " seq={seq}")?;
        }
        write!(f, "{}", Value(r.json()))
    }
}

/// ` value=..` of a JSON object's `value` field (a float to 4 decimals,
/// anything else as sent), or nothing if it has none.
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
            _ => write!(f, " value={raw}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Value;

    #[test]
    fn value_shows_floats_to_four_decimals_and_the_rest_as_sent() {
        let v = |json: &str| Value(json.as_bytes()).to_string();
        assert_eq!(v(r#"{"value":0.56412345}"#), " value=0.5641");
        assert_eq!(v(r#"{"value":1e-3}"#), " value=0.0010");
        assert_eq!(v(r#"{"seq":1,"value":42}"#), " value=42");
        assert_eq!(v(r#"{"value":"up"}"#), r#" value="up""#);
        assert_eq!(v(r#"{"other":1}"#), "");
        assert_eq!(v("not json"), "");
    }
}
