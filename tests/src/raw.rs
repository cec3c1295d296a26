//! A raw quiche client for protocol tests: it writes whatever bytes a test
//! wants on whatever stream, with or without FIN, optionally one chunk per
//! packet, and keeps what the server answered on each stream.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use quic_report_core::{CoreRng, MAX_DATAGRAM_SIZE};

use crate::cert_path;

/// What the server did on one stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StreamSeen {
    /// Bytes the server sent.
    pub data: Vec<u8>,
    /// The server FINed the stream.
    pub fin: bool,
    /// The server sent STOP_SENDING with this code.
    pub stopped: Option<u64>,
}

impl StreamSeen {
    /// The answer lines, each parsed as JSON.
    pub fn answers(&self) -> Vec<serde_json::Value> {
        self.data
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap_or(serde_json::Value::Null))
            .collect()
    }
}

/// A raw client.
pub struct RawPeer {
    /// Its address.
    pub addr: SocketAddr,
    /// The connection.
    pub conn: quiche::Connection,
    /// Per stream, what came back.
    pub streams: BTreeMap<u64, StreamSeen>,
    /// Writes waiting for the handshake (or for the previous chunk's packet).
    writes: VecDeque<(u64, Vec<u8>, bool)>,
    /// Send each queued write in a packet of its own.
    pub one_chunk_per_packet: bool,
    /// While set, what the server sends on streams is not read (its flow
    /// control credit is not given back).
    pub read_paused: bool,
    scratch: Vec<u8>,
}

impl RawPeer {
    /// Connects to `server`, offering `alpn`, verifying against the dev CA.
    pub fn connect(
        addr: SocketAddr,
        server: SocketAddr,
        alpn: &[&[u8]],
        rng: &mut CoreRng,
    ) -> RawPeer {
        RawPeer::connect_with(addr, server, alpn, rng, |_| {}, None)
    }

    /// Like [`RawPeer::connect`], with `adjust` applied to the quiche config
    /// last, and offering `session` (from [`quiche::Connection::session`],
    /// possibly altered) for resumption.
    pub fn connect_with(
        addr: SocketAddr,
        server: SocketAddr,
        alpn: &[&[u8]],
        rng: &mut CoreRng,
        adjust: impl FnOnce(&mut quiche::Config),
        session: Option<&[u8]>,
    ) -> RawPeer {
        let mut cfg = quiche::Config::new(quiche::PROTOCOL_VERSION).expect("version 1");
        cfg.set_application_protos(alpn).expect("valid ALPN");
        cfg.verify_peer(true);
        cfg.load_verify_locations_from_file(cert_path("ca.pem").to_str().expect("utf-8 path"))
            .expect("dev CA loads");
        cfg.set_max_idle_timeout(30_000);
        cfg.set_max_recv_udp_payload_size(MAX_DATAGRAM_SIZE);
        cfg.set_max_send_udp_payload_size(MAX_DATAGRAM_SIZE);
        cfg.set_initial_max_data(10_000_000);
        cfg.set_initial_max_stream_data_bidi_local(1_000_000);
        cfg.set_initial_max_stream_data_bidi_remote(1_000_000);
        cfg.set_initial_max_streams_bidi(100);
        cfg.set_initial_max_streams_uni(100);
        adjust(&mut cfg);
        let mut scid = [0u8; 16];
        rng.fill(&mut scid);
        let scid = quiche::ConnectionId::from_ref(&scid);
        let mut conn =
            quiche::connect(Some("localhost"), &scid, addr, server, &mut cfg).expect("connect");
        if let Some(session) = session {
            conn.set_session(session)
                .expect("a session quiche can parse");
        }
        RawPeer {
            addr,
            conn,
            streams: BTreeMap::new(),
            writes: VecDeque::new(),
            one_chunk_per_packet: false,
            read_paused: false,
            scratch: vec![0; 65536],
        }
    }

    /// Queues bytes for stream `sid` (written once the handshake is done).
    pub fn write(&mut self, sid: u64, data: &[u8], fin: bool) {
        self.streams.entry(sid).or_default();
        self.writes.push_back((sid, data.to_vec(), fin));
    }

    /// Queues `data` on `sid` as 1-byte chunks, each in its own packet, then FIN.
    pub fn write_bytewise(&mut self, sid: u64, data: &[u8]) {
        self.one_chunk_per_packet = true;
        self.streams.entry(sid).or_default();
        for (i, b) in data.iter().enumerate() {
            self.writes.push_back((sid, vec![*b], i + 1 == data.len()));
        }
    }

    /// What came back on `sid`.
    pub fn seen(&self, sid: u64) -> StreamSeen {
        self.streams.get(&sid).cloned().unwrap_or_default()
    }

    /// Whether nothing is left to write.
    pub fn writes_done(&self) -> bool {
        self.writes.is_empty()
    }

    /// The next datagram this peer wants to send and its destination, for
    /// a test that carries packets by hand (a peer not added to a `Sim`).
    pub fn next_datagram(&mut self) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 65536];
        let (len, to) = self.poll_transmit(&mut buf)?;
        buf.truncate(len);
        Some((buf, to))
    }

    /// Hands this peer a datagram by hand (see [`RawPeer::next_datagram`]).
    pub fn receive(&mut self, from: SocketAddr, data: &mut [u8]) {
        let to = self.addr;
        self.handle_datagram(from, to, data);
    }

    pub(crate) fn handle_datagram(&mut self, from: SocketAddr, to: SocketAddr, data: &mut [u8]) {
        let _ = self.conn.recv(data, quiche::RecvInfo { from, to });
        self.read();
    }

    pub(crate) fn handle_timeout(&mut self) {
        self.conn.on_timeout();
        self.read();
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.conn.timeout_instant()
    }

    fn read(&mut self) {
        // STOP_SENDING shows up as an error on write; look before reading,
        // since reading the FIN lets quiche forget a stream whose sending
        // side was stopped.
        let ids: Vec<u64> = self
            .streams
            .keys()
            .copied()
            .chain(self.writes.iter().map(|w| w.0))
            .collect();
        for sid in ids {
            if let Err(quiche::Error::StreamStopped(code)) = self.conn.stream_writable(sid, 0) {
                self.streams.entry(sid).or_default().stopped = Some(code);
                self.writes.retain(|w| w.0 != sid);
            }
        }
        if self.read_paused {
            return;
        }
        let readable: Vec<u64> = self.conn.readable().collect();
        for sid in readable {
            while let Ok((n, fin)) = self.conn.stream_recv(sid, &mut self.scratch) {
                let s = self.streams.entry(sid).or_default();
                s.data.extend_from_slice(&self.scratch[..n]);
                s.fin |= fin;
            }
        }
    }

    fn pump_writes(&mut self) -> bool {
        if !self.conn.is_established() {
            return false;
        }
        let mut wrote = false;
        while let Some((sid, data, fin)) = self.writes.pop_front() {
            match self.conn.stream_send(sid, &data, fin) {
                Ok(n) if n == data.len() => wrote = true,
                Ok(n) => {
                    self.writes.push_front((sid, data[n..].to_vec(), fin));
                    return true;
                }
                Err(quiche::Error::Done) => {
                    self.writes.push_front((sid, data, fin));
                    return wrote;
                }
                Err(quiche::Error::StreamStopped(code)) => {
                    self.streams.entry(sid).or_default().stopped = Some(code);
                    self.writes.retain(|w| w.0 != sid);
                }
                Err(_) => {}
            }
            if self.one_chunk_per_packet {
                return true;
            }
        }
        wrote
    }

    pub(crate) fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
        loop {
            match self.conn.send(buf) {
                Ok((len, info)) => return Some((len, info.to)),
                Err(_) => {
                    if !self.pump_writes() {
                        return None;
                    }
                }
            }
        }
    }
}

/// A serialized quiche session (see [`quiche::Connection::session`]) with
/// the server's transport parameter `id` replaced by the varint `value`: a
/// resuming client then believes the server allows what it never did
/// (e.g. `0x08`, `initial_max_streams_bidi`), as a hostile client would.
/// `None` if the session is not in quiche's format or lacks the parameter.
pub fn session_with_transport_param(session: &[u8], id: u64, value: u64) -> Option<Vec<u8>> {
    let be_u64 = |b: &[u8]| -> Option<usize> {
        usize::try_from(u64::from_be_bytes(b.get(..8)?.try_into().ok()?)).ok()
    };
    let tls_len = be_u64(session)?;
    let tls_end = 8usize.checked_add(tls_len)?;
    let params_len = be_u64(session.get(tls_end..)?)?;
    let mut params = session.get(tls_end + 8..tls_end + 8 + params_len)?;
    let mut out_params = Vec::new();
    let mut found = false;
    while !params.is_empty() {
        let pid = take_varint(&mut params)?;
        let len = usize::try_from(take_varint(&mut params)?).ok()?;
        let val = params.get(..len)?;
        params = &params[len..];
        put_varint(&mut out_params, pid);
        if pid == id {
            found = true;
            let mut v = Vec::new();
            put_varint(&mut v, value);
            put_varint(&mut out_params, v.len() as u64);
            out_params.extend_from_slice(&v);
        } else {
            put_varint(&mut out_params, len as u64);
            out_params.extend_from_slice(val);
        }
    }
    if !found {
        return None;
    }
    let mut out = session[..tls_end].to_vec();
    out.extend_from_slice(&(out_params.len() as u64).to_be_bytes());
    out.extend_from_slice(&out_params);
    Some(out)
}

/// Reads a QUIC varint (RFC 9000 16) off the front of `b`.
pub fn take_varint(b: &mut &[u8]) -> Option<u64> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    let bytes = b.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for x in &bytes[1..] {
        v = (v << 8) | u64::from(*x);
    }
    *b = &b[len..];
    Some(v)
}

/// Appends `v` as a QUIC varint (RFC 9000 16); `v` must be below 2^62.
pub fn put_varint(out: &mut Vec<u8>, v: u64) {
    if v < 1 << 6 {
        out.push(v as u8);
    } else if v < 1 << 14 {
        out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes());
    } else {
        out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}
