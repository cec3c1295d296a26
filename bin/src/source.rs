//! `quic-report source`: a tiny HTTP endpoint (tiny_http). `GET /` answers
//! `200 {"value": <random f64 in [0, 1)>}` as `application/json`; any other
//! path is `404`, any other method `405`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tiny_http::{Header, Method, Request, Response};

/// A bound source, ready to serve.
pub struct Source {
    server: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
    addr: SocketAddr,
}

/// Stops a [`Source`] serving on another thread.
#[derive(Clone)]
pub struct SourceStopper {
    server: Arc<tiny_http::Server>,
    stopping: Arc<AtomicBool>,
}

impl SourceStopper {
    /// Makes [`Source::serve`] return (after the request in progress).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.server.unblock();
    }
}

impl Source {
    /// Binds the HTTP listener (port 0: any free port, see [`Source::addr`]).
    pub fn bind(listen: SocketAddr) -> io::Result<Source> {
        let server = tiny_http::Server::http(listen)
            .map_err(|e| io::Error::other(format!("cannot listen on {listen}: {e}")))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| io::Error::other("the HTTP listener has no IP address"))?;
        Ok(Source {
            server: Arc::new(server),
            stopping: Arc::new(AtomicBool::new(false)),
            addr,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle to stop it from another thread.
    pub fn stopper(&self) -> SourceStopper {
        SourceStopper {
            server: Arc::clone(&self.server),
            stopping: Arc::clone(&self.stopping),
        }
    }

    /// Answers requests until stopped; `on_request` sees each one.
    pub fn serve(&self, on_request: &mut dyn FnMut(&Answered)) {
        while !self.stopping.load(Ordering::SeqCst) {
            match self.server.recv() {
                Ok(req) => on_request(&answer(req)),
                Err(_) if self.stopping.load(Ordering::SeqCst) => break,
                Err(e) => {
                    log::warn!("accepting an HTTP connection: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// One answered request, for a log line.
pub struct Answered {
    peer: String,
    method: Method,
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

/// Answers one request.
fn answer(req: Request) -> Answered {
    let method = req.method().clone();
    let url = req.url().to_owned();
    let peer = req
        .remote_addr()
        .map_or_else(|| "-".to_owned(), ToString::to_string);
    let path = url.split('?').next().unwrap_or("");
    let mut value = None;
    let (status, body) = if method != Method::Get {
        (405, "method not allowed: use GET\n".to_owned())
    } else if path == "/" {
        let v: f64 = rand::random();
        value = Some(v);
        (200, serde_json::json!({ "value": v }).to_string())
    } else {
        (404, "not found: try GET /\n".to_owned())
    };
    let ctype = if value.is_some() {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    let mut resp = Response::from_string(body).with_status_code(status);
    if let Ok(h) = Header::from_bytes("Content-Type", ctype) {
        resp = resp.with_header(h);
    }
    if status == 405
        && let Ok(h) = Header::from_bytes("Allow", "GET")
    {
        resp = resp.with_header(h);
    }
    if let Err(e) = req.respond(resp) {
        log::warn!("answering {peer}: {e}");
    }
    Answered {
        peer,
        method,
        url,
        status,
        value,
    }
}
