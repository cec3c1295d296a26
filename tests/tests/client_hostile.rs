//! The client core against a server that misbehaves: a raw quiche server
//! in this test, packets carried by hand, time from a virtual clock. What
//! is asserted is what the client saw and what it told the server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quic_report_core::{
    ALPN, Client, ClientConfig, ClientEvent, ClientState, CoreRng, MAX_DATAGRAM_SIZE, Sample,
    Verify, client::MAX_ANSWER_BYTES, config::codes,
};
use quic_report_tests::{VirtualClock, cert_path};

/// What a [`RawServer`] does to its connection after the first datagram.
type OnFirst = Box<dyn FnMut(&mut quiche::Connection)>;

/// A quiche server that accepts one connection and does what the test
/// says on its streams.
struct RawServer {
    addr: SocketAddr,
    cfg: quiche::Config,
    conn: Option<quiche::Connection>,
    /// Run on the connection after its first datagram.
    on_first: Option<OnFirst>,
}

impl RawServer {
    fn new(addr: SocketAddr) -> RawServer {
        RawServer::with(addr, |_| {})
    }

    /// [`RawServer::new`] with `adjust` applied to its config last.
    fn with(addr: SocketAddr, adjust: impl FnOnce(&mut quiche::Config)) -> RawServer {
        let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION).expect("version 1");
        cfg.set_application_protos(&[ALPN]).expect("valid ALPN");
        cfg.load_cert_chain_from_pem_file(cert_path("localhost.pem").to_str().expect("utf-8"))
            .expect("the dev certificate loads");
        cfg.load_priv_key_from_pem_file(cert_path("localhost.key").to_str().expect("utf-8"))
            .expect("the dev key loads");
        cfg.set_max_idle_timeout(30_000);
        cfg.set_max_recv_udp_payload_size(MAX_DATAGRAM_SIZE);
        cfg.set_max_send_udp_payload_size(MAX_DATAGRAM_SIZE);
        cfg.set_initial_max_data(10_000_000);
        cfg.set_initial_max_stream_data_bidi_remote(1_000_000);
        cfg.set_initial_max_streams_bidi(100);
        adjust(&mut cfg);
        RawServer {
            addr,
            cfg,
            conn: None,
            on_first: None,
        }
    }

    fn receive(&mut self, from: SocketAddr, data: &mut [u8]) {
        let first = self.conn.is_none();
        if first {
            let hdr =
                quiche::Header::from_slice(data, quiche::MAX_CONN_ID_LEN).expect("an Initial");
            let scid = quiche::ConnectionId::from_ref(&[7u8; 16]);
            let conn = quiche::accept(&scid, Some(&hdr.dcid), self.addr, from, &mut self.cfg)
                .expect("accept");
            self.conn = Some(conn);
        }
        if let Some(c) = &mut self.conn {
            let _ = c.recv(
                data,
                quiche::RecvInfo {
                    from,
                    to: self.addr,
                },
            );
            if first && let Some(f) = &mut self.on_first {
                f(c);
            }
        }
    }
}

/// The client and the server, carrying packets between them until neither
/// has more to send, then moving the clock to the next timer (at most `step`).
fn exchange(
    client: &mut Client,
    server: &mut RawServer,
    clock: &mut VirtualClock,
    step: Duration,
    events: &mut Vec<ClientEvent>,
) {
    let local = client.path().0;
    let mut buf = vec![0u8; 65_536];
    let now = &mut clock.now();
    loop {
        let mut moved = false;
        while let Some(t) = client.poll_transmit(*now, &mut buf) {
            server.receive(local, &mut buf[..t.len]);
            moved = true;
        }
        if let Some(c) = &mut server.conn {
            while let Ok((len, _)) = c.send(&mut buf) {
                let _ = client.handle_datagram(*now, server.addr, local, &mut buf[..len]);
                moved = true;
            }
        }
        while let Some(ev) = client.poll_event() {
            events.push(ev);
        }
        if !moved {
            break;
        }
    }
    let mut next = client
        .poll_timeout()
        .unwrap_or(*now + step)
        .min(*now + step);
    if let Some(t) = server.conn.as_ref().and_then(|c| c.timeout_instant()) {
        next = next.min(t);
    }
    clock.advance_to(next.max(*now));
    *now = clock.now();
    client.handle_timeout(*now);
    if let Some(c) = &mut server.conn
        && c.timeout_instant().is_some_and(|t| t <= *now)
    {
        c.on_timeout();
    }
}

/// A client of `server` with client id `c1`.
fn client_for(server: SocketAddr, now: Instant) -> Client {
    let client_addr: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
    let mut cfg = ClientConfig::new(server, client_addr, Verify::CaFile(cert_path("ca.pem")));
    cfg.client_id = Some("c1".into());
    Client::new(cfg, CoreRng::from_seed(11), now).expect("a valid config")
}

/// An answer that never ends its line (a server that is broken, or not
/// ours) is read up to a limit, then given up: the client tells the server
/// to stop sending on that stream, says it is retrying the report, and
/// does not buffer the garbage further.
#[test]
fn an_answer_without_end_is_given_up_with_a_retry_and_the_stream_stopped() {
    let server_addr: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
    let mut clock = VirtualClock::install();
    let mut client = client_for(server_addr, clock.now());
    client.submit(
        clock.now(),
        Sample::from_json(br#"{"value":0.5}"#, 1).expect("a sample"),
    );
    let mut server = RawServer::new(server_addr);
    let mut events = Vec::new();
    let garbage = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    let mut report_bytes = 0usize;
    let mut stopped = None;
    for _ in 0..2_000 {
        exchange(
            &mut client,
            &mut server,
            &mut clock,
            Duration::from_millis(5),
            &mut events,
        );
        let Some(c) = &mut server.conn else { continue };
        // Read the report, then answer it with garbage and no newline.
        let mut sink = [0u8; 65_536];
        while let Ok((n, _)) = c.stream_recv(0, &mut sink) {
            report_bytes += n;
        }
        if report_bytes == 0 {
            continue;
        }
        match c.stream_writable(0, 0) {
            Err(quiche::Error::StreamStopped(code)) => {
                stopped = Some(code);
                break;
            }
            _ => {
                if sent < 4 * MAX_ANSWER_BYTES
                    && let Ok(n) = c.stream_send(0, &garbage, false)
                {
                    sent += n;
                }
            }
        }
    }
    assert_eq!(
        stopped,
        Some(codes::STREAM_REJECTED),
        "the client stops the stream (after {sent} bytes); events: {events:?}"
    );
    assert!(
        sent < 2 * MAX_ANSWER_BYTES,
        "it stopped reading soon after the limit: {sent} bytes sent"
    );
    let retried: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Retrying { seq, reason } => Some((*seq, reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        retried,
        [(1, format!("answer longer than {MAX_ANSWER_BYTES} bytes"))],
        "events: {events:?}"
    );
    assert_eq!(client.queued(), 1, "the report waits to be sent again");
}

/// From review: a server that gives no stream credit (none at all, or no
/// MAX_STREAMS any more) held the client Connected for ever, its queue
/// growing, keep-alives keeping the connection up. Reports waiting with
/// none in flight and no stream to send them on now count as unanswered:
/// past the response timeout the client gives the connection up and tries
/// again.
#[test]
fn a_server_that_grants_no_stream_is_given_up() {
    let mut clock = VirtualClock::install();
    let server_addr: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
    let mut client = client_for(server_addr, clock.now());
    client.submit(
        clock.now(),
        Sample::from_json(br#"{"value":0.5}"#, 1).expect("a sample"),
    );
    let mut server = RawServer::with(server_addr, |c| c.set_initial_max_streams_bidi(0));
    let mut events = Vec::new();
    let start = clock.now();
    while clock.now() < start + Duration::from_secs(60) {
        exchange(
            &mut client,
            &mut server,
            &mut clock,
            Duration::from_secs(1),
            &mut events,
        );
    }
    let gave_up = events.iter().any(|e| {
        matches!(
            e,
            ClientEvent::Disconnected {
                reason: quic_report_core::DisconnectReason::NoResponse,
                ..
            }
        )
    });
    assert!(
        gave_up,
        "after 60 s: state {:?}, {} queued; events: {events:?}",
        client.state(),
        client.queued()
    );
    assert_eq!(client.queued(), 1, "the report is kept");
}

/// From review: a close naming a client-certificate alert (here
/// certificate_required) that came before the server proved who it is
/// stopped the client for good (exit 1), though anyone who sees the
/// client's first packet can send one (Initial keys are public). It is now
/// a failed attempt, retried with backoff; the same alert once the
/// handshake is done still stops it (`bin/tests/mutual_tls.rs`).
#[test]
fn a_client_certificate_alert_before_the_server_is_proven_is_retried() {
    let mut clock = VirtualClock::install();
    let server_addr: SocketAddr = "127.0.0.1:4433".parse().expect("addr");
    let mut client = client_for(server_addr, clock.now());
    let mut server = RawServer::new(server_addr);
    server.on_first = Some(Box::new(|c: &mut quiche::Connection| {
        assert!(!c.is_established());
        c.close(false, 0x100 + 116, b"").expect("close");
    }));
    let mut events = Vec::new();
    for _ in 0..50 {
        exchange(
            &mut client,
            &mut server,
            &mut clock,
            Duration::from_millis(100),
            &mut events,
        );
    }
    assert_ne!(client.state(), ClientState::Failed, "events: {events:?}");
    assert!(
        events.iter().any(|e| matches!(
            e,
            ClientEvent::Disconnected {
                reason: quic_report_core::DisconnectReason::HandshakeFailed(_),
                ..
            }
        )),
        "events: {events:?}"
    );
}
