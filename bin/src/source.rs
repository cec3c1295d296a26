//! `quic-report source`: a tiny HTTP endpoint. `GET /` answers
//! `200 {"value": <random f64 in [0, 1)>}` as `application/json`; any other
//! path is `404`, any other method `405`. Served by an [`HttpEndpoint`]
//! (bounded connections and time per connection; a request's body is
//! never waited for).

use std::io;
use std::net::SocketAddr;

use quic_report_mio::HttpEndpoint;
use quic_report_mio::http_endpoint::{Request, Response};

/// A source serving on its own thread until dropped.
#[derive(Debug)]
pub struct Source {
    endpoint: HttpEndpoint,
}

impl Source {
    /// Listens on `listen` (port 0: any free port, see [`Source::addr`])
    /// and serves; `on_request` sees each answered request.
    pub fn start(
        listen: SocketAddr,
        mut on_request: impl FnMut(&Answered) + Send + 'static,
    ) -> io::Result<Source> {
        let endpoint = HttpEndpoint::start(
            listen,
            "source",
            Box::new(move |r: &Request<'_>| {
                let (answered, response) = answer(r);
                on_request(&answered);
                response
            }),
        )
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
        Ok(Source { endpoint })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }
}

/// One answered request, for a log line.
pub struct Answered {
    peer: SocketAddr,
    method: String,
    url: String,
    status: u16,
    value: Option<f64>,
}

impl Answered {
    /// `GET / -> 0.6815`, or `GET /x -> 404` (the demo's line).
    pub fn short(&self) -> String {
        match self.value {
            Some(v) => format!("{} {} -> {v:.4}", self.method, self.url),
            None => format!("{} {} -> {}", self.method, self.url, self.status),
        }
    }

    /// `127.0.0.1:5000 GET / -> 200 {"value":0.68150...}` (the log line).
    pub fn long(&self) -> String {
        let mut s = format!(
            "{} {} {} -> {}",
            self.peer, self.method, self.url, self.status
        );
        if let Some(v) = self.value {
            s.push_str(&format!(" {}", serde_json::json!({ "value": v })));
        }
        s
    }
}

/// The answer to one request, and what to say of it.
fn answer(r: &Request<'_>) -> (Answered, Response) {
    let mut value = None;
    let response = if r.method != "GET" {
        Response::new(
            405,
            "text/plain; charset=utf-8",
            "method not allowed: use GET\n",
        )
        .with_header("Allow", "GET")
    } else if r.path() == "/" {
        let v: f64 = rand::random();
        value = Some(v);
        Response::new(
            200,
            "application/json",
            serde_json::json!({ "value": v }).to_string(),
        )
    } else {
        Response::new(404, "text/plain; charset=utf-8", "not found: try GET /\n")
    };
    let answered = Answered {
        peer: r.peer,
        // Shown in logs: at most 200 characters of whatever was sent,
        // control characters (a terminal's escape sequences) as `?`.
        method: printable(r.method, 16),
        url: printable(r.target, 200),
        status: response.status,
        value,
    };
    (answered, response)
}

/// The first `max` characters of `s`, each control character as `?`.
fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn send(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// From review: a POST whose body never comes (tiny_http waited for it,
    /// and every fetch of the demo's client timed out) leaves `GET /`
    /// answered.
    #[test]
    fn get_answers_a_value_whatever_else_is_held_open() {
        let (tx, seen) = mpsc::channel();
        let source = Source::start("127.0.0.1:0".parse().expect("addr"), move |a| {
            let _ = tx.send(a.short());
        })
        .expect("starts");
        let addr = source.addr();
        let mut held = TcpStream::connect(addr).expect("connect");
        held.write_all(b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n")
            .expect("write");
        let text = send(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert!(
            v["value"].as_f64().is_some_and(|x| (0.0..1.0).contains(&x)),
            "{v}"
        );
        let t = send(addr, b"GET /x HTTP/1.0\r\n\r\n");
        assert!(t.starts_with("HTTP/1.1 404"), "{t}");
        let t = send(addr, b"GET /\x1b[2J HTTP/1.0\r\n\r\n");
        assert!(t.starts_with("HTTP/1.1 404"), "{t}");
        let lines: Vec<String> = seen.try_iter().collect();
        assert!(lines.contains(&"GET /?[2J -> 404".to_owned()), "{lines:?}");
        assert!(lines.contains(&"POST / -> 405".to_owned()), "{lines:?}");
        assert!(lines.contains(&"GET /x -> 404".to_owned()), "{lines:?}");
        assert!(
            lines.iter().any(|l| l.starts_with("GET / -> 0.")),
            "{lines:?}"
        );
    }
}
