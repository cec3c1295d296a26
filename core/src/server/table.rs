//! The server's connection table: every live connection, and the indexes
//! that find one without a scan. It owns their consistency; the protocol
//! code in `server.rs` only asks for changes through its methods.
//!
//! - `conns`: a connection by [`ConnKey`] (ordered, so walks are
//!   deterministic);
//! - `routes`: a connection by destination connection ID;
//! - `timers`: the connections whose deadline is due, by deadline;
//! - `sending`: the connections that may have datagrams to send;
//! - `handshaking`: how many handshakes are in progress;
//! - `handshakes_from`: how many of them come from each origin
//!   ([`origin_of`]);
//! - `half_open`: the connections in the order they came, for the oldest
//!   handshake still in progress ([`ConnTable::stalest_half_open`]).
//!
//! Invariants:
//! - every route names a live connection, and a connection's `cids` are
//!   the routes that name it;
//! - a connection has at most one entry in `timers` (`Conn::indexed`), never
//!   later than its deadline (`Conn::deadline`): an entry left earlier by a
//!   deadline that moved later fires early once and is re-filed by
//!   [`ConnTable::pop_due`], which costs less than a remove and an insert
//!   per datagram;
//! - `sending` holds a live connection at most once (`Conn::queued`); it may
//!   still hold removed ones, which are skipped;
//! - `handshaking` counts the live connections that are not established,
//!   and `handshakes_from` the same by origin (no entry at 0);
//! - `half_open` holds every live connection that is not established, in
//!   key order; it may still hold others, which are skipped.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use quiche::ConnectionId;

use super::{ConnKey, StreamState};
use crate::identity::Identity;

/// Spare connection IDs an established connection is given, at most.
const MAX_CIDS: usize = 8;

/// Where a handshake comes from, for the limit on handshakes in progress
/// from one origin: the IPv4 address (an IPv4-mapped one too), or the IPv6
/// /64, what one host or one site is usually given.
pub(super) fn origin_of(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// One connection: quiche's state and ours. The fields the table keeps in
/// its indexes are private to this module.
pub(super) struct Conn {
    pub(super) quic: quiche::Connection,
    /// The client's address (the active path's).
    pub(super) peer: SocketAddr,
    /// When a handshake still in progress is reaped.
    pub(super) handshake_deadline: Instant,
    pub(super) streams: BTreeMap<u64, StreamState>,
    /// Streams whose every answer quiche has taken and whose FIN is due:
    /// written just before the connection's next packet is built (see
    /// `Server::write_streams`).
    pub(super) fins_due: Vec<u64>,
    /// Objects received on it.
    pub(super) reports: u64,
    /// Its copies parked on another copy the application holds (their
    /// answers wait in `Server::awaiting` until that one's fate is known).
    pub(super) parked: usize,
    /// The keys its parked copies wait on (some perhaps answered since,
    /// while `parked` is not 0): where `Server::forget_parked` looks,
    /// instead of every key of every connection.
    pub(super) parked_keys: Vec<crate::RecordKey>,
    /// Its routing entries.
    cids: Vec<ConnectionId<'static>>,
    /// Where its handshake came from ([`origin_of`] of its first address).
    origin: IpAddr,
    /// Its address was proven by a Retry: its handshake counts in
    /// `handshakes_from`.
    pub(super) validated: bool,
    /// Its handshake completed.
    opened: bool,
    /// When it next needs `Server::handle_timeout`.
    deadline: Option<Instant>,
    /// Its entry in `timers`, if any: never later than `deadline`.
    indexed: Option<Instant>,
    /// It is in `sending`.
    queued: bool,
    /// Who it is, settled before any of its streams is read (see
    /// `Server::settle_identity`); it opens only once this is known.
    pub(super) identity: Option<Identity>,
    /// A `ServerEvent::HandshakeRefused` was sent for it.
    pub(super) refused: bool,
}

impl Conn {
    /// A connection whose handshake has begun.
    pub(super) fn new(
        quic: quiche::Connection,
        peer: SocketAddr,
        handshake_deadline: Instant,
    ) -> Conn {
        Conn {
            quic,
            peer,
            handshake_deadline,
            streams: BTreeMap::new(),
            fins_due: Vec::new(),
            reports: 0,
            parked: 0,
            parked_keys: Vec::new(),
            cids: Vec::new(),
            origin: origin_of(peer),
            validated: false,
            opened: false,
            deadline: None,
            indexed: None,
            queued: false,
            identity: None,
            refused: false,
        }
    }

    /// Whether its handshake completed.
    pub(super) fn opened(&self) -> bool {
        self.opened
    }

    /// Whether it is waiting in the send queue.
    pub(super) fn queued(&self) -> bool {
        self.queued
    }
}

/// The live connections and their indexes (see the module docs).
#[derive(Default)]
pub(super) struct ConnTable {
    /// Boxed: a quiche connection is about 8 KB, and the map moves its
    /// entries on every insert and removal.
    conns: BTreeMap<ConnKey, Box<Conn>>,
    routes: HashMap<ConnectionId<'static>, ConnKey>,
    timers: BTreeSet<(Instant, ConnKey)>,
    sending: VecDeque<ConnKey>,
    handshaking: usize,
    handshakes_from: HashMap<IpAddr, usize>,
    half_open: VecDeque<ConnKey>,
    next_key: u64,
}

impl ConnTable {
    /// Live connections.
    pub(super) fn len(&self) -> usize {
        self.conns.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Live connections whose handshake is in progress.
    pub(super) fn handshaking(&self) -> usize {
        self.handshaking
    }

    pub(super) fn get(&self, key: ConnKey) -> Option<&Conn> {
        self.conns.get(&key).map(|c| &**c)
    }

    pub(super) fn get_mut(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns.get_mut(&key).map(|c| &mut **c)
    }

    pub(super) fn contains(&self, key: ConnKey) -> bool {
        self.conns.contains_key(&key)
    }

    /// Every live connection, in key order.
    pub(super) fn values(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values().map(|c| &**c)
    }

    /// The keys of every live connection, in order.
    pub(super) fn keys(&self) -> Vec<ConnKey> {
        self.conns.keys().copied().collect()
    }

    /// The connection a destination connection ID routes to.
    pub(super) fn lookup(&self, dcid: &ConnectionId<'_>) -> Option<ConnKey> {
        self.routes.get(dcid).copied()
    }

    /// Adds a connection, routed by `cids`, under a new key.
    pub(super) fn insert(&mut self, mut conn: Conn, cids: Vec<ConnectionId<'static>>) -> ConnKey {
        let key = ConnKey(self.next_key);
        self.next_key += 1;
        for cid in &cids {
            self.routes.insert(cid.clone(), key);
        }
        conn.cids = cids;
        if !conn.opened {
            self.handshaking += 1;
            if conn.validated {
                *self.handshakes_from.entry(conn.origin).or_default() += 1;
            }
            self.skip_opened();
            self.half_open.push_back(key);
        }
        self.conns.insert(key, Box::new(conn));
        key
    }

    /// Handshakes in progress from the origin of `addr` ([`origin_of`])
    /// whose address a Retry proved.
    pub(super) fn handshakes_from(&self, addr: SocketAddr) -> usize {
        self.handshakes_from
            .get(&origin_of(addr))
            .copied()
            .unwrap_or(0)
    }

    /// The oldest connection whose handshake is still in progress, if its
    /// handshake deadline is `deadline` or earlier.
    pub(super) fn stalest_half_open(&mut self, deadline: Instant) -> Option<ConnKey> {
        self.skip_opened();
        let key = *self.half_open.front()?;
        let conn = self.conns.get(&key)?;
        (conn.handshake_deadline <= deadline).then_some(key)
    }

    /// Drops the keys at the front of `half_open` that are no longer
    /// half-open connections.
    fn skip_opened(&mut self) {
        while let Some(key) = self.half_open.front() {
            match self.conns.get(key) {
                Some(c) if !c.opened => break,
                _ => {
                    self.half_open.pop_front();
                }
            }
        }
    }

    /// One handshake from `origin` fewer (counted there if `validated`).
    fn handshake_over(&mut self, origin: IpAddr, validated: bool) {
        self.handshaking -= 1;
        if !validated {
            return;
        }
        if let Some(n) = self.handshakes_from.get_mut(&origin) {
            *n -= 1;
            if *n == 0 {
                self.handshakes_from.remove(&origin);
            }
        }
    }

    /// Marks the connection established if quiche says its handshake is
    /// done and its identity is settled; true the first time only.
    pub(super) fn note_established(&mut self, key: ConnKey) -> bool {
        let Some(conn) = self.conns.get_mut(&key) else {
            return false;
        };
        if conn.opened || !conn.quic.is_established() || conn.identity.is_none() {
            return false;
        }
        conn.opened = true;
        let (origin, validated) = (conn.origin, conn.validated);
        self.handshake_over(origin, validated);
        true
    }

    /// Forgets the connection IDs the client retired and, once established,
    /// gives it spare ones (up to [`MAX_CIDS`], as quiche allows) so it can
    /// change address: `new_cid` makes one and its stateless reset token.
    pub(super) fn manage_cids(
        &mut self,
        key: ConnKey,
        mut new_cid: impl FnMut() -> (ConnectionId<'static>, u128),
    ) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        while let Some(cid) = conn.quic.retired_scid_next() {
            if self.routes.get(&cid) == Some(&key) {
                self.routes.remove(&cid);
            }
            conn.cids.retain(|c| *c != cid);
        }
        if !conn.quic.is_established() {
            return;
        }
        while conn.quic.scids_left() > 0 && conn.cids.len() < MAX_CIDS {
            let (cid, reset_token) = new_cid();
            if conn.quic.new_scid(&cid, reset_token, false).is_err() {
                break;
            }
            self.routes.insert(cid.clone(), key);
            conn.cids.push(cid);
        }
    }

    /// Puts the connection in the send queue (once).
    pub(super) fn queue_send(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key)
            && !conn.queued
        {
            conn.queued = true;
            self.sending.push_back(key);
        }
    }

    /// The connection at the head of the send queue, with removed ones
    /// dropped from it.
    pub(super) fn next_to_send(&mut self) -> Option<(ConnKey, &mut Conn)> {
        while let Some(&key) = self.sending.front() {
            if self.conns.contains_key(&key) {
                let conn = self.conns.get_mut(&key)?;
                return Some((key, &mut **conn));
            }
            self.sending.pop_front();
        }
        None
    }

    /// The head of the send queue has nothing more to send: dequeue it.
    pub(super) fn sent_all(&mut self, key: ConnKey) {
        if self.sending.front() == Some(&key) {
            self.sending.pop_front();
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.queued = false;
        }
    }

    /// Sets when the connection next needs `handle_timeout`. The timer
    /// index is only touched when the deadline comes earlier than its
    /// entry (quiche's moves later with almost every packet).
    pub(super) fn rearm(&mut self, key: ConnKey, deadline: Option<Instant>) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.deadline = deadline;
        if let Some(at) = deadline
            && conn.indexed.is_none_or(|i| at < i)
        {
            if let Some(old) = conn.indexed.replace(at) {
                self.timers.remove(&(old, key));
            }
            self.timers.insert((at, key));
        }
    }

    /// The next connection whose deadline is due at `now` (its timer entry
    /// taken), re-filing entries that fired early.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<ConnKey> {
        while let Some(&(at, key)) = self.timers.first() {
            if at > now {
                return None;
            }
            self.timers.pop_first();
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.indexed = None;
            if let Some(later) = conn.deadline.filter(|d| *d > now) {
                conn.indexed = Some(later);
                self.timers.insert((later, key));
                continue;
            }
            return Some(key);
        }
        None
    }

    /// The earliest timer entry.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Removes a connection and every index entry naming it.
    pub(super) fn remove(&mut self, key: ConnKey) -> Option<Box<Conn>> {
        let conn = self.conns.remove(&key)?;
        if !conn.opened {
            self.handshake_over(conn.origin, conn.validated);
        }
        if let Some(at) = conn.indexed {
            self.timers.remove(&(at, key));
        }
        for cid in &conn.cids {
            if self.routes.get(cid) == Some(&key) {
                self.routes.remove(cid);
            }
        }
        Some(conn)
    }
}
