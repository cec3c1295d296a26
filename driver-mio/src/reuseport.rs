//! Several server processes on one UDP port (`server --reuseport`), with
//! each client's packets steered to the process that holds its connection.
//!
//! The kernel spreads the datagrams of a port shared with `SO_REUSEPORT`
//! over the group's sockets by a hash of the 4-tuple. That keeps a client
//! on one process only while its address stays the same: after a NAT
//! rebinding or a move to another network its packets hash elsewhere, to a
//! process that does not know the connection and answers a stateless reset.
//! (The client then reconnects, resumes its session and sends what was not
//! acknowledged; with a shared database nothing is lost or recorded twice,
//! but it costs a reconnect per address change.)
//!
//! **Steering.** Each process puts its *worker byte* first in every
//! connection ID it issues ([`quic_report_core::Server::set_cid_prefix`]),
//! and a classic BPF program on the group ([`attach_steering`],
//! `SO_ATTACH_REUSEPORT_CBPF`, the approach of nginx's `quic_bpf` and
//! Cloudflare's udpgrm) returns, for a short-header packet, the first byte
//! of its destination connection ID as the index of the socket to deliver
//! it to. Long-header packets (Initial, Handshake, 0-RTT) get an invalid
//! index, for which the kernel falls back to its hash: a new connection
//! lands where the hash puts it, and stays there.
//!
//! **The worker byte is the socket's index in the group**, which the
//! kernel assigns (in the order sockets join; when one leaves, the last one
//! takes its place), so each process learns it rather than being told it
//! ([`Steering`]): it sends itself probes, short-header datagrams whose
//! "connection ID" starts with 0, 1, ..., [`MAX_WORKERS`]-1, from a socket of
//! its own, and the smallest number among the probes that arrive on its
//! socket is its index (probes past the group's size fall back to the hash
//! and may land anywhere, always on a larger number). It probes at start
//! and every [`PROBE_EVERY`]. A round's smallest number is taken when two
//! rounds in a row agree on it: a round whose own probe was lost (a full
//! receive buffer under load) sees only hashed ones, a number no socket
//! of the group may have, and one round must not make the process issue
//! it. So a process issues its byte two rounds after start, and after a
//! process dies and another takes its place, every process issues the
//! right byte again within two rounds; connections issued a byte that
//! went stale meanwhile get a stateless reset and reconnect. Up to
//! [`MAX_WORKERS`] processes are steered; more are served by the hash
//! alone.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use crate::batch::sockaddr_of;

/// Processes steered at most (socket indexes 0..MAX_WORKERS).
pub const MAX_WORKERS: u8 = 16;

/// How often a process checks its index in the group.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// What follows the index byte in a probe.
const PROBE_MAGIC: &[u8; 8] = b"qr-probe";
/// A probe: `0x40` (a short header), the index, the magic, an 8-byte nonce.
const PROBE_LEN: usize = 2 + PROBE_MAGIC.len() + 8;

/// Binds a UDP socket with `SO_REUSEPORT` set (other processes may bind
/// the same address with it too).
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a descriptor we own from the start
    // (wrapped at once, so it is closed on every error path); the sockaddr
    // is sized and initialised by `sockaddr_of`.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = UdpSocket::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        let (storage, len) = sockaddr_of(addr);
        if libc::bind(fd, (&raw const storage).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }
}

/// The steering program: short header -> the first byte of the
/// destination connection ID (right after the first byte); long header ->
/// an invalid index (the kernel's hash).
fn program() -> [libc::sock_filter; 5] {
    const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const RET_A: u16 = (libc::BPF_RET | libc::BPF_A) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        op(LD_B_ABS, 0, 0, 0),     // A = first byte of the UDP payload
        op(JSET_K, 0, 1, 0x80),    // long header?
        op(RET_K, 0, 0, u32::MAX), // yes: no such socket, use the hash
        op(LD_B_ABS, 0, 0, 1),     // no: A = first byte of the DCID
        op(RET_A, 0, 0, 0),        // the socket at that index
    ]
}

/// Attaches the steering program to `sock`'s reuseport group (it applies
/// to every socket of the group; attaching it again replaces it).
pub fn attach_steering(sock: &UdpSocket) -> io::Result<()> {
    let mut filter = program();
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: the program outlives the call, which copies it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const prog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Learns this process's index in its reuseport group by probing itself
/// (see the module doc). The loop calls [`Steering::probe`] when
/// [`Steering::deadline`] passes and shows it every datagram first
/// ([`Steering::intercept`]).
#[derive(Debug)]
pub struct Steering {
    /// Where probes are sent from.
    prober: UdpSocket,
    /// The group's address, as the probes reach it.
    target: SocketAddr,
    nonce: u64,
    /// The smallest index seen in this round.
    best: Option<u8>,
    /// The smallest index of the round before.
    last_best: Option<u8>,
    /// Our index as last learned (two rounds agreed on it).
    index: Option<u8>,
    next: Instant,
}

impl Steering {
    /// For a group bound to `listen` (an unspecified address is probed
    /// through loopback).
    pub fn new(listen: SocketAddr, now: Instant) -> io::Result<Steering> {
        let target = match listen {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::from((Ipv6Addr::LOCALHOST, a.port()))
            }
            other => other,
        };
        let prober = UdpSocket::bind(crate::udp::unspecified(target))?;
        prober.set_nonblocking(true)?;
        Ok(Steering {
            prober,
            target,
            nonce: 0,
            best: None,
            last_best: None,
            index: None,
            next: now,
        })
    }

    /// When the next round of probes is due.
    pub fn deadline(&self) -> Instant {
        self.next
    }

    /// Ends the round under way and sends a new one (a new nonce:
    /// arrivals of older rounds are ignored). Returns our index when it
    /// changed: the smallest of the round that ended, if the round before
    /// saw the same.
    pub fn probe(&mut self, now: Instant, nonce: u64) -> Option<u8> {
        let seen = self.best.take();
        let learned = match seen {
            Some(b) if self.last_best == seen && self.index != seen => {
                self.index = Some(b);
                Some(b)
            }
            _ => None,
        };
        self.last_best = seen;
        self.nonce = nonce;
        self.next = now + PROBE_EVERY;
        let mut d = [0u8; PROBE_LEN];
        d[0] = 0x40;
        d[2..2 + PROBE_MAGIC.len()].copy_from_slice(PROBE_MAGIC);
        d[2 + PROBE_MAGIC.len()..].copy_from_slice(&nonce.to_be_bytes());
        for i in 0..MAX_WORKERS {
            d[1] = i;
            if let Err(e) = self.prober.send_to(&d, self.target) {
                log::debug!("reuseport probe {i} to {}: {e}", self.target);
            }
        }
        learned
    }

    /// Whether `data` is a probe (ours or another process's): it is not
    /// for the core. A probe of this round counts towards its smallest
    /// index ([`Steering::probe`] takes it).
    pub fn intercept(&mut self, data: &[u8]) -> bool {
        if !is_probe(data) {
            return false;
        }
        let mut nonce = [0u8; 8];
        nonce.copy_from_slice(&data[2 + PROBE_MAGIC.len()..]);
        let index = data[1];
        if u64::from_be_bytes(nonce) == self.nonce && self.best.is_none_or(|b| index < b) {
            self.best = Some(index);
        }
        true
    }

    /// Our index as last learned.
    pub fn index(&self) -> Option<u8> {
        self.index
    }
}

/// Whether a datagram is a probe: [`Steering::intercept`] without the state.
pub fn is_probe(data: &[u8]) -> bool {
    data.len() == PROBE_LEN && &data[2..2 + PROBE_MAGIC.len()] == PROBE_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_steers_short_headers_by_their_first_dcid_byte() {
        let p = program();
        assert_eq!(p.len(), 5);
        assert_eq!(p[1].k, 0x80, "the long-header bit");
        assert_eq!(p[2].k, u32::MAX, "long headers: the kernel's hash");
        assert_eq!(p[3].k, 1, "the DCID's first byte");
    }

    #[test]
    fn the_smallest_probe_is_the_index_once_two_rounds_agree() {
        let now = Instant::now();
        let mut s = Steering::new("127.0.0.1:9".parse().expect("addr"), now).expect("binds");
        let probe = |i: u8, nonce: u64| {
            let mut d = vec![0x40, i];
            d.extend_from_slice(PROBE_MAGIC);
            d.extend_from_slice(&nonce.to_be_bytes());
            d
        };
        // Each round: its arrivals, then what the next round's start learns.
        let round = |s: &mut Steering, nonce: u64, arrivals: &[u8]| {
            for i in arrivals {
                assert!(s.intercept(&probe(*i, nonce)));
            }
            assert!(s.intercept(&probe(0, nonce - 1)), "an old round's probe");
            s.probe(now, nonce + 1)
        };
        assert_eq!(s.probe(now, 7), None);
        assert_eq!(
            round(&mut s, 7, &[5, 1, 9]),
            None,
            "one round is not enough"
        );
        assert_eq!(round(&mut s, 8, &[1, 12]), Some(1), "two agree");
        assert_eq!(s.index(), Some(1));
        // Our own probe lost: only a hashed one, a number past the group.
        assert_eq!(round(&mut s, 9, &[9]), None);
        assert_eq!(s.index(), Some(1), "kept");
        assert_eq!(round(&mut s, 10, &[1]), None);
        // A real change (a process before us died): two rounds, then taken.
        assert_eq!(round(&mut s, 11, &[0, 3]), None);
        assert_eq!(round(&mut s, 12, &[0]), Some(0));
        assert!(!s.intercept(b"\x40\x01 not a probe at all"));
        assert!(is_probe(&probe(0, 1)));
    }
}
