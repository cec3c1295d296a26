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
        let mut scid = [0u8; 16];
        rng.fill(&mut scid);
        let scid = quiche::ConnectionId::from_ref(&scid);
        let conn =
            quiche::connect(Some("localhost"), &scid, addr, server, &mut cfg).expect("connect");
        RawPeer {
            addr,
            conn,
            streams: BTreeMap::new(),
            writes: VecDeque::new(),
            one_chunk_per_packet: false,
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
