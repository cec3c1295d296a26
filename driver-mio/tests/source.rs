//! What ureq brings to the fetch, against small servers on 127.0.0.1: an
//! `https://` source signed by a private CA (the development CA in
//! `certs/`), redirects, a `CONNECT` proxy that counts what passed through
//! it (and `NO_PROXY` going around it), and an error naming the cause of
//! each failure. Every server runs on its own thread on a free port; every
//! wait is bounded (the request timeout).

mod common;

use common::{certs, client_options, start_server};

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use quic_report_mio::source_resolver::SourceResolver;
use quic_report_mio::{ClientDriver, FetchError, FetchOptions, Source, SourceProxy, SourceTrust};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Reads one request head (GETs have no body); `None` if the peer left.
fn read_head(r: &mut impl Read) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match r.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    String::from_utf8(head).ok()
}

/// The path of a request head.
fn path_of(head: &str) -> String {
    head.split_whitespace().nth(1).unwrap_or("/").to_owned()
}

fn respond(w: &mut impl Write, status: &str, headers: &str, body: &str) {
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}",
        body.len()
    );
    let _ = w.flush();
}

/// An HTTP server answering `answer(path)` = (status, extra headers, body),
/// one request per connection.
fn http_server(answer: fn(&str) -> (&'static str, String, String)) -> SocketAddr {
    let (l, addr) = listener();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            thread::spawn(move || {
                if let Some(head) = read_head(&mut c) {
                    let (status, headers, body) = answer(&path_of(&head));
                    respond(&mut c, status, &headers, &body);
                }
            });
        }
    });
    addr
}

/// An HTTPS server with the development certificate (localhost,
/// 127.0.0.1, ::1; signed by certs/ca.pem): `{"value": 42}` on every path.
fn https_server() -> SocketAddr {
    let dir = certs();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("localhost.pem"))
            .expect("certificate file")
            .collect::<Result<_, _>>()
            .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(dir.join("localhost.key")).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    let config = Arc::new(config);
    let (l, addr) = listener();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(tcp) = conn else { return };
            let config = Arc::clone(&config);
            thread::spawn(move || {
                let Ok(tls) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut s = rustls::StreamOwned::new(tls, tcp);
                // A client that refuses the certificate ends here.
                if read_head(&mut s).is_some() {
                    respond(&mut s, "200 OK", "", r#"{"value": 42}"#);
                    s.conn.send_close_notify();
                    let _ = s.flush();
                }
            });
        }
    });
    addr
}

/// A `CONNECT` proxy that writes down the target of every tunnel.
fn counting_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let (l, addr) = listener();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut client) = conn else { return };
            let log = Arc::clone(&log);
            thread::spawn(move || {
                let Some(head) = read_head(&mut client) else {
                    return;
                };
                let mut words = head.split_whitespace();
                let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
                    respond(&mut client, "405 Method Not Allowed", "", "");
                    return;
                };
                log.lock().expect("log").push(target.to_owned());
                let Ok(upstream) = TcpStream::connect(target) else {
                    respond(&mut client, "502 Bad Gateway", "", "");
                    return;
                };
                let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                let (mut up_r, mut up_w) = (upstream.try_clone().expect("clone"), upstream);
                let mut client_r = client.try_clone().expect("clone");
                thread::spawn(move || {
                    let _ = io::copy(&mut client_r, &mut up_w);
                    let _ = up_w.shutdown(std::net::Shutdown::Write);
                });
                let _ = io::copy(&mut up_r, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, seen)
}

fn opts(url: String) -> FetchOptions {
    FetchOptions::new(url, Duration::from_secs(1))
}

fn dev_ca() -> SourceTrust {
    SourceTrust::ca_file(&certs().join("ca.pem")).expect("the development CA")
}

fn value(res: Result<quic_report_core::Sample, FetchError>) -> f64 {
    match res {
        Ok(s) => s.fields["value"].as_f64().expect("a number"),
        Err(e) => panic!("fetch failed: {e}"),
    }
}

fn error(o: &FetchOptions) -> String {
    match Source::new(o).expect("valid options").fetch() {
        Ok(s) => panic!("fetched {s:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn an_https_source_signed_by_a_private_ca_is_fetched_and_reported() {
    let tls = https_server();
    // Through the whole client: fetched on the helper thread, reported.
    let (server_addr, server_stop, recorded, server) = start_server();
    let mut copts = client_options(server_addr);
    copts.count = Some(2);
    copts.fetch = Some(FetchOptions {
        count: Some(2),
        trust: dev_ca(),
        ..FetchOptions::new(
            format!("https://localhost:{}/", tls.port()),
            Duration::from_millis(50),
        )
    });
    let driver = ClientDriver::new(copts).expect("client binds");
    let stop = driver.stop_handle();
    let dog = thread::spawn(move || {
        thread::sleep(Duration::from_secs(20));
        stop.stop();
    });
    let summary = driver.run(&mut |_, _| {}).expect("client closes");
    server_stop.stop();
    server.join().expect("server thread").expect("server ok");
    drop(dog);
    assert_eq!(summary.stats.acknowledged, 2, "stopped by the watchdog?");
    let values: Vec<_> = recorded
        .try_iter()
        .filter_map(|r| r.fields()["value"].as_f64())
        .collect();
    assert_eq!(values, [42.0, 42.0]);

    // By IP address (the certificate names 127.0.0.1 too).
    let o = FetchOptions {
        trust: dev_ca(),
        ..opts(format!("https://{tls}/"))
    };
    assert_eq!(value(Source::new(&o).expect("valid").fetch()), 42.0);

    // Not signed by a CA we trust: refused, and the message says so.
    for trust in [
        SourceTrust::none(),
        SourceTrust::ca_file(&certs().join("test/untrusted.pem")).expect("a PEM certificate"),
    ] {
        let o = FetchOptions {
            trust,
            ..opts(format!("https://{tls}/"))
        };
        let e = error(&o);
        assert!(e.starts_with("TLS with 127.0.0.1: "), "{e}");
        assert!(
            e.contains("UnknownIssuer") && e.contains("trusting "),
            "{e}"
        );
    }
    assert!(
        SourceTrust::ca_file(&certs().join("nonexistent.pem"))
            .expect_err("missing")
            .contains("nonexistent.pem")
    );
}

#[test]
fn redirects_are_followed_up_to_a_limit() {
    let tls = https_server();
    let tls_port = tls.port();
    // The handler is a fn pointer: the https port goes through a static.
    static TLS_PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    TLS_PORT.get_or_init(|| tls_port);
    let http = http_server(|path| match path {
        "/a" => ("302 Found", "Location: /b\r\n".into(), String::new()),
        "/b" => (
            "301 Moved Permanently",
            "Location: /c\r\n".into(),
            String::new(),
        ),
        "/c" => ("200 OK", String::new(), r#"{"value": 7}"#.into()),
        "/tls" => (
            "307 Temporary Redirect",
            format!(
                "Location: https://localhost:{}/\r\n",
                TLS_PORT.get().copied().unwrap_or(0)
            ),
            String::new(),
        ),
        _ => ("302 Found", format!("Location: {path}\r\n"), String::new()),
    });
    let fetch = |path: &str| {
        let o = FetchOptions {
            trust: dev_ca(),
            ..opts(format!("http://{http}{path}"))
        };
        Source::new(&o).expect("valid").fetch()
    };
    assert_eq!(value(fetch("/a")), 7.0, "two redirects");
    assert_eq!(value(fetch("/tls")), 42.0, "http to https");
    let e = fetch("/loop").expect_err("a redirect loop");
    assert!(matches!(e, FetchError::TooManyRedirects), "{e}");
    assert_eq!(e.to_string(), "more than 5 redirects");
}

#[test]
fn a_proxy_carries_the_fetches_and_no_proxy_goes_around_it() {
    let http = http_server(|_| ("200 OK", String::new(), r#"{"value": 1}"#.into()));
    let tls = https_server();
    let (proxy, seen) = counting_proxy();
    let through = |url: String, no_proxy: &[&str]| FetchOptions {
        trust: dev_ca(),
        proxy: Some(SourceProxy {
            url: format!("http://{proxy}"),
            no_proxy: no_proxy.iter().map(|s| (*s).to_owned()).collect(),
        }),
        ..opts(url)
    };
    let o = through(format!("http://{http}/"), &[]);
    assert_eq!(value(Source::new(&o).expect("valid").fetch()), 1.0);
    let o = through(format!("https://localhost:{}/", tls.port()), &[]);
    assert_eq!(value(Source::new(&o).expect("valid").fetch()), 42.0);
    assert_eq!(
        *seen.lock().expect("log"),
        [http.to_string(), format!("localhost:{}", tls.port())],
        "both went through the proxy"
    );
    // NO_PROXY: straight to the source.
    let o = through(format!("http://{http}/"), &["example.com", "127.0.0.1"]);
    assert_eq!(value(Source::new(&o).expect("valid").fetch()), 1.0);
    assert_eq!(
        seen.lock().expect("log").len(),
        2,
        "NO_PROXY went around it"
    );

    // A proxy that is not there: the error names the proxy.
    let (gone, gone_addr) = listener();
    drop(gone);
    let o = FetchOptions {
        proxy: Some(SourceProxy {
            url: format!("http://{gone_addr}"),
            no_proxy: vec![],
        }),
        ..opts(format!("http://{http}/"))
    };
    let e = error(&o);
    assert!(e.starts_with(&format!("proxy http://{gone_addr}: ")), "{e}");
}

#[test]
fn each_failure_names_its_cause() {
    let (closed, closed_addr) = listener();
    drop(closed);
    let e = error(&opts(format!("http://{closed_addr}/")));
    assert!(e.starts_with("connecting to 127.0.0.1: "), "{e}");
    assert!(e.to_lowercase().contains("refused"), "{e}");

    let http = http_server(|path| match path {
        "/missing" => ("404 Not Found", String::new(), "no".into()),
        // Over 63 KiB: a report made of it would not fit the server's 64 KiB.
        "/big" => ("200 OK", String::new(), " ".repeat(64_600)),
        // Under 63 KiB, but written out again (`1e2` as `100.0`) over 64 KiB.
        "/grows" => (
            "200 OK",
            String::new(),
            format!("{{\"v\":[{}1e2]}}", "1e2,".repeat(15_000)),
        ),
        "/text" => ("200 OK", String::new(), "hello".into()),
        _ => ("200 OK", String::new(), "[1, 2]".into()),
    });
    for (path, want) in [
        ("/missing", "HTTP status 404 Not Found"),
        ("/big", "body larger than 64512 bytes"),
        ("/grows", "the report made of the body could be 90"),
        ("/text", "source answered invalid JSON"),
        ("/array", "source answered array, not a JSON object"),
    ] {
        let e = error(&opts(format!("http://{http}{path}")));
        assert!(e.starts_with(want), "{path}: {e}");
    }

    // Accepts, never answers: timed out (1 s), and said so.
    let (silent, silent_addr) = listener();
    let hold = thread::spawn(move || {
        let c = silent.accept();
        thread::sleep(Duration::from_secs(3));
        drop(c);
    });
    let e = error(&opts(format!("http://{silent_addr}/")));
    assert_eq!(e, "no answer within 1s (waiting for the response)");
    drop(hold);

    // A garbled answer.
    let (garbage, garbage_addr) = listener();
    thread::spawn(move || {
        if let Ok((mut c, _)) = garbage.accept() {
            let _ = read_head(&mut c);
            let _ = c.write_all(b"SPLAT\r\n\r\n");
        }
    });
    let e = error(&opts(format!("http://{garbage_addr}/")));
    assert!(e.starts_with("bad response: "), "{e}");
}

#[test]
fn every_agent_made_from_one_set_of_options_shares_its_lookups() {
    // A resolver that hangs until the test lets it answer, counting lookups.
    let http = http_server(|_| ("200 OK", String::new(), r#"{"value": 3}"#.into()));
    let lookups = Arc::new(Mutex::new(0u32));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let counted = Arc::clone(&lookups);
    let resolver = SourceResolver::with(move |_name| {
        *counted.lock().expect("count") += 1;
        let _ = released
            .lock()
            .expect("release")
            .recv_timeout(Duration::from_secs(20));
        Ok(vec![http])
    });
    let o = FetchOptions {
        resolver,
        ..opts(format!("http://hung.invalid:{}/", http.port()))
    };
    // The fetch thread's agent, and the one it builds again after a panic
    // (or a thread started again): both from these options.
    let first = Source::new(&o).expect("valid");
    let rebuilt = Source::new(&o).expect("valid");
    for source in [&first, &rebuilt, &first] {
        let e = source.fetch().expect_err("the lookup hangs");
        assert!(
            matches!(
                e,
                FetchError::Timeout {
                    phase: "looking the host up",
                    ..
                }
            ),
            "{e}"
        );
    }
    assert_eq!(
        *lookups.lock().expect("count"),
        1,
        "one lookup under way for the name, whichever agent asks"
    );
    // Its late answer serves the next fetch, of either agent.
    release.send(()).expect("the lookup waits");
    assert_eq!(value(rebuilt.fetch()), 3.0);
    assert_eq!(*lookups.lock().expect("count"), 1);
}
