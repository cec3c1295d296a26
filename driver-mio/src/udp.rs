//! [`UdpIo`]: the UDP socket of a driver loop over `mio::net::UdpSocket`.
//!
//! - Receive until `WouldBlock`, retrying on `Interrupted`.
//! - Send; when the socket says `WouldBlock`, hold the datagram (and every
//!   later one, to keep the order), ask for WRITABLE and flush when writable.
//!   The held queue is bounded ([`MAX_HELD`]): past that it is dropped with a
//!   warning (QUIC's loss recovery resends what matters).
//! - On a connected socket the kernel reports ICMP errors (port or host
//!   unreachable) as `ECONNREFUSED`/`EHOSTUNREACH`/`ENETUNREACH` on the next
//!   receive or send; those (and a send with no route, or from an address
//!   that is gone) are reported as [`Recv::Unreachable`] /
//!   [`Sent::Unreachable`] so the client can give up its attempt at once.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use crate::DriverError;
use crate::batch::{RecvBatch, SendBatch};

/// Most datagrams held while the socket is not writable.
pub const MAX_HELD: usize = 1024;

/// What one receive gave.
#[derive(Debug)]
pub enum Recv {
    /// A datagram of `len` bytes from `from` is in the buffer.
    Datagram {
        /// Its length.
        len: usize,
        /// Its sender.
        from: SocketAddr,
    },
    /// The peer is unreachable (an ICMP error on a connected socket).
    Unreachable(io::Error),
}

/// What became of one datagram handed to [`UdpIo::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Handed to the kernel.
    Sent,
    /// Held until the socket is writable.
    Held,
    /// Dropped on an error (logged).
    Dropped,
    /// The peer is unreachable (an ICMP error on a connected socket); the
    /// datagram was dropped.
    Unreachable,
}

/// A UDP socket registered in a poll, with a queue of held datagrams.
#[derive(Debug)]
pub struct UdpIo {
    socket: UdpSocket,
    token: Token,
    local: SocketAddr,
    peer: Option<SocketAddr>,
    held: VecDeque<(Vec<u8>, SocketAddr)>,
    writable_interest: bool,
}

impl UdpIo {
    /// Binds a socket to `addr` and registers it under `token` (READABLE).
    pub fn bind(addr: SocketAddr, registry: &Registry, token: Token) -> Result<UdpIo, DriverError> {
        let socket = UdpSocket::bind(addr).map_err(|source| DriverError::Bind { addr, source })?;
        UdpIo::from_socket(socket, registry, token)
    }

    /// Binds a socket on an ephemeral port of `peer`'s family and connects
    /// it to `peer`, so ICMP errors surface as `ECONNREFUSED`.
    ///
    /// With no route to `peer` (the network is not up yet: `connect` says
    /// `ENETUNREACH`), the socket is left unconnected: sends to `peer` then
    /// come back [`Sent::Unreachable`] until there is a route, and the
    /// caller makes a new socket for a later attempt.
    pub fn connect(
        peer: SocketAddr,
        registry: &Registry,
        token: Token,
    ) -> Result<UdpIo, DriverError> {
        let any = unspecified(peer);
        let socket =
            UdpSocket::bind(any).map_err(|source| DriverError::Bind { addr: any, source })?;
        let connected = match socket.connect(peer) {
            Ok(()) => true,
            Err(e) if is_unreachable(&e) => {
                log::debug!("no route to {peer} yet ({e}): the socket stays unconnected");
                false
            }
            Err(source) => return Err(DriverError::Bind { addr: peer, source }),
        };
        let mut io = UdpIo::from_socket(socket, registry, token)?;
        io.peer = connected.then_some(peer);
        Ok(io)
    }

    /// Takes an already bound socket (e.g. bound by the caller to learn its
    /// port early) and registers it under `token`.
    pub fn from_std(
        socket: std::net::UdpSocket,
        registry: &Registry,
        token: Token,
    ) -> Result<UdpIo, DriverError> {
        socket
            .set_nonblocking(true)
            .map_err(DriverError::io("making the UDP socket non-blocking"))?;
        UdpIo::from_socket(UdpSocket::from_std(socket), registry, token)
    }

    fn from_socket(
        mut socket: UdpSocket,
        registry: &Registry,
        token: Token,
    ) -> Result<UdpIo, DriverError> {
        let local = socket
            .local_addr()
            .map_err(DriverError::io("reading the socket's local address"))?;
        registry
            .register(&mut socket, token, Interest::READABLE)
            .map_err(DriverError::io("registering the UDP socket"))?;
        Ok(UdpIo {
            socket,
            token,
            local,
            peer: None,
            held: VecDeque::new(),
            writable_interest: false,
        })
    }

    /// Takes the socket out of the poll (before it is dropped for a new
    /// one, as mio asks); a failure is logged, the socket closes anyway.
    pub fn deregister(&mut self, registry: &Registry) {
        if let Err(e) = registry.deregister(&mut self.socket) {
            log::debug!("deregistering the UDP socket {}: {e}", self.local);
        }
        if !self.held.is_empty() {
            log::debug!(
                "{} datagram(s) held for the old socket {} dropped",
                self.held.len(),
                self.local
            );
        }
    }

    /// The address the socket is bound to (after `connect`, with the source
    /// IP the kernel chose).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Datagrams waiting for the socket to become writable.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Receives one datagram into `buf`; `Ok(None)` when there is none
    /// (`WouldBlock`). Other errors are returned as they are.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Recv>> {
        loop {
            match self.socket.recv_from(buf) {
                Ok((len, from)) => return Ok(Some(Recv::Datagram { len, from })),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_unreachable(&e) => return Ok(Some(Recv::Unreachable(e))),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads up to [`crate::batch::BATCH`] datagrams into `batch` (one
    /// `recvmmsg` on Linux): how many, 0 when none is waiting. An error is
    /// the socket's (an ICMP report, say); the next call reads on.
    pub fn recv_batch(&mut self, batch: &mut RecvBatch) -> io::Result<usize> {
        loop {
            #[cfg(target_os = "linux")]
            let r = {
                use std::os::fd::AsRawFd;
                crate::batch::recvmmsg(self.socket.as_raw_fd(), batch)
            };
            #[cfg(not(target_os = "linux"))]
            let r = batch.fill_from(&self.socket);
            match r {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `data` to `to`, or holds it if the socket is not writable (or
    /// datagrams are already held, to keep the order).
    pub fn send(&mut self, registry: &Registry, data: &[u8], to: SocketAddr) -> Sent {
        if !self.held.is_empty() {
            self.hold(registry, data, to);
            return Sent::Held;
        }
        loop {
            match self.send_once(data, to) {
                Ok(_) => return Sent::Sent,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.hold(registry, data, to);
                    return Sent::Held;
                }
                Err(e) if is_unreachable(&e) => {
                    log::debug!("send to {to}: {e}");
                    return Sent::Unreachable;
                }
                Err(e) => {
                    log::debug!("send of {} bytes to {to} failed, dropped: {e}", data.len());
                    return Sent::Dropped;
                }
            }
        }
    }

    /// Sends every datagram of `batch`, in order, and empties it: one
    /// `sendmmsg` per call on Linux. What the socket cannot take now is
    /// held (see [`UdpIo::send`]); a datagram the kernel refuses is dropped
    /// (logged at debug), as with `send`.
    pub fn send_batch(&mut self, registry: &Registry, batch: &mut SendBatch) {
        let mut i = 0;
        if self.held.is_empty() {
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                let fd = self.socket.as_raw_fd();
                while i < batch.len() {
                    match crate::batch::sendmmsg(fd, batch, i) {
                        Ok(n) => i += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            let (data, to) = batch.get(i);
                            log::debug!(
                                "send of {} bytes to {to} failed, dropped: {e}",
                                data.len()
                            );
                            i += 1;
                        }
                    }
                }
            }
            #[cfg(not(target_os = "linux"))]
            while i < batch.len() {
                let (data, to) = batch.get(i);
                let data = data.to_vec();
                i += 1;
                if self.send(registry, &data, to) == Sent::Held {
                    break;
                }
            }
        }
        for j in i..batch.len() {
            let (data, to) = batch.get(j);
            let data = data.to_vec();
            self.hold(registry, &data, to);
        }
        batch.clear();
    }

    /// Sends held datagrams until the socket would block again (call on a
    /// WRITABLE event). Returns whether the kernel reported the peer
    /// unreachable on the way.
    pub fn flush(&mut self, registry: &Registry) -> bool {
        let mut unreachable = false;
        while let Some((data, to)) = self.held.front() {
            match self.send_once(data, *to) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return unreachable,
                Err(e) if is_unreachable(&e) => {
                    log::debug!("send to {to}: {e}");
                    unreachable = true;
                }
                Err(e) => log::debug!(
                    "send of {} held bytes to {to} failed, dropped: {e}",
                    data.len()
                ),
            }
            self.held.pop_front();
        }
        self.set_writable_interest(registry, false);
        unreachable
    }

    fn send_once(&self, data: &[u8], to: SocketAddr) -> io::Result<usize> {
        match self.peer {
            Some(peer) if peer == to => self.socket.send(data),
            _ => self.socket.send_to(data, to),
        }
    }

    fn hold(&mut self, registry: &Registry, data: &[u8], to: SocketAddr) {
        if self.held.len() >= MAX_HELD {
            log::warn!(
                "UDP socket {} not writable: dropping {} held datagrams",
                self.local,
                self.held.len()
            );
            self.held.clear();
        }
        self.held.push_back((data.to_vec(), to));
        self.set_writable_interest(registry, true);
    }

    fn set_writable_interest(&mut self, registry: &Registry, on: bool) {
        if self.writable_interest == on {
            return;
        }
        let interest = if on {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        match registry.reregister(&mut self.socket, self.token, interest) {
            Ok(()) => self.writable_interest = on,
            Err(e) => log::warn!("cannot change the UDP socket's interest: {e}"),
        }
    }
}

/// Whether a socket error says the peer cannot be reached from here: an
/// ICMP "unreachable" report, no route, a network that is down, or a
/// source address that is gone (ours changed).
pub fn is_unreachable(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ConnectionRefused
        || matches!(
            e.raw_os_error(),
            Some(
                libc::ECONNREFUSED
                    | libc::EHOSTUNREACH
                    | libc::ENETUNREACH
                    | libc::ENETDOWN
                    | libc::EADDRNOTAVAIL
            )
        )
}

/// The unspecified address, port 0, of `peer`'s family.
pub fn unspecified(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    }
}
