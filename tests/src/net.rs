//! A seeded in-memory network: loss, duplication, reordering, delay,
//! blackholes. Every decision comes from the seed and the packet's index
//! (never its contents), so the same seed makes the same decisions.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quic_report_core::CoreRng;

/// How the network treats packets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetConfig {
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter]`, for every packet.
    pub jitter: Duration,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Probability that a packet is held back by `reorder_delay` (so later
    /// ones overtake it).
    pub reorder: f64,
    /// How long a reordered packet is held back.
    pub reorder_delay: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            delay: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(15),
        }
    }
}

/// A datagram in flight.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Packet {
    /// Sender.
    pub from: SocketAddr,
    /// Receiver.
    pub to: SocketAddr,
    /// Bytes.
    pub data: Vec<u8>,
}

/// Counters of what the network did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Packets handed to the network.
    pub sent: u64,
    /// Packets lost (including blackholed).
    pub lost: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Packets held back.
    pub reordered: u64,
}

/// The network.
#[derive(Debug)]
pub struct Net {
    /// Current behaviour; may be changed between steps.
    pub cfg: NetConfig,
    rng: CoreRng,
    queue: BinaryHeap<Reverse<(Instant, u64, Packet)>>,
    index: u64,
    blackhole_until: Option<Instant>,
    /// Packets from this address sent before this time are lost.
    silenced: Option<(SocketAddr, Instant)>,
    /// Counters.
    pub stats: NetStats,
}

impl Net {
    /// A network whose decisions follow `seed`.
    pub fn new(cfg: NetConfig, seed: u64) -> Net {
        Net {
            cfg,
            rng: CoreRng::from_seed(seed ^ 0x6e65_7477_6f72_6b00),
            queue: BinaryHeap::new(),
            index: 0,
            blackhole_until: None,
            silenced: None,
            stats: NetStats::default(),
        }
    }

    /// Every packet sent before `until` is lost.
    pub fn blackhole(&mut self, until: Instant) {
        self.blackhole_until = Some(until);
    }

    /// Every packet `from` sends before `until` is lost (one way: what it
    /// is sent still arrives).
    pub fn silence(&mut self, from: SocketAddr, until: Instant) {
        self.silenced = Some((from, until));
    }

    /// Sends a datagram at `now`.
    pub fn send(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        self.stats.sent += 1;
        // Draw every number for every packet, so one decision never shifts
        // the draws of the next packet.
        let (l, d, r, j, j2) = (
            self.rng.unit_f64(),
            self.rng.unit_f64(),
            self.rng.unit_f64(),
            self.rng.unit_f64(),
            self.rng.unit_f64(),
        );
        let silenced = self.silenced.is_some_and(|(a, t)| a == from && now < t);
        if silenced || self.blackhole_until.is_some_and(|t| now < t) || l < self.cfg.loss {
            self.stats.lost += 1;
            return;
        }
        let mut at = now + self.cfg.delay + self.cfg.jitter.mul_f64(j);
        if r < self.cfg.reorder {
            self.stats.reordered += 1;
            at += self.cfg.reorder_delay;
        }
        let pkt = Packet {
            from,
            to,
            data: data.to_vec(),
        };
        if d < self.cfg.duplicate {
            self.stats.duplicated += 1;
            let again = at + self.cfg.jitter.mul_f64(j2) + Duration::from_micros(100);
            self.push(again, pkt.clone());
        }
        self.push(at, pkt);
    }

    fn push(&mut self, at: Instant, pkt: Packet) {
        self.index += 1;
        self.queue.push(Reverse((at, self.index, pkt)));
    }

    /// When the next packet arrives.
    pub fn next_arrival(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The next packet due at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Packet> {
        if self.next_arrival()? > now {
            return None;
        }
        self.queue.pop().map(|Reverse((_, _, p))| p)
    }

    /// Packets in flight.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}
