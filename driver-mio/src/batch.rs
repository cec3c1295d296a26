//! Many datagrams per system call. [`SendBatch`] holds up to [`BATCH`]
//! datagrams (each to its own address) that the loop fills from the core's
//! `poll_transmit`, and [`crate::udp::UdpIo::send_batch`] hands them to the
//! kernel with `sendmmsg(2)` on Linux (one `send_to` each elsewhere).
//! [`RecvBatch`] is the other way: [`crate::udp::UdpIo::recv_batch`] fills
//! it with up to [`BATCH`] datagrams per `recvmmsg(2)`.
//!
//! The server answers many connections per wake-up; on loopback one
//! `sendmmsg` of 32 datagrams costs the server less CPU than 32 `sendto`
//! calls (the README's benchmark table has the figures). GSO would need
//! equal-sized datagrams to one address, which answers to different clients
//! are not, so it is not used.

use std::net::SocketAddr;

use quic_report_core::MAX_DATAGRAM_SIZE;

/// Datagrams per batch.
pub const BATCH: usize = 32;

/// Up to [`BATCH`] datagrams waiting to be sent, in order.
#[derive(Debug)]
pub struct SendBatch {
    /// `BATCH` slots of `MAX_DATAGRAM_SIZE` bytes.
    bufs: Vec<u8>,
    /// Length and destination of each filled slot.
    meta: Vec<(usize, SocketAddr)>,
}

impl Default for SendBatch {
    fn default() -> SendBatch {
        SendBatch::new()
    }
}

impl SendBatch {
    /// An empty batch.
    pub fn new() -> SendBatch {
        SendBatch {
            bufs: vec![0; BATCH * MAX_DATAGRAM_SIZE],
            meta: Vec::with_capacity(BATCH),
        }
    }

    /// The next free slot, to write one datagram into (then call
    /// [`SendBatch::push`]). Panics if the batch is full.
    pub fn slot(&mut self) -> &mut [u8] {
        let i = self.meta.len();
        assert!(i < BATCH, "slot() on a full batch");
        &mut self.bufs[i * MAX_DATAGRAM_SIZE..(i + 1) * MAX_DATAGRAM_SIZE]
    }

    /// Takes the datagram just written into [`SendBatch::slot`].
    pub fn push(&mut self, len: usize, to: SocketAddr) {
        debug_assert!(len <= MAX_DATAGRAM_SIZE);
        self.meta.push((len.min(MAX_DATAGRAM_SIZE), to));
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    /// No datagram waiting.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// No free slot left.
    pub fn is_full(&self) -> bool {
        self.meta.len() == BATCH
    }

    /// Datagram `i`: its bytes and destination.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddr) {
        let (len, to) = self.meta[i];
        let start = i * MAX_DATAGRAM_SIZE;
        (&self.bufs[start..start + len], to)
    }

    /// Forgets every datagram.
    pub fn clear(&mut self) {
        self.meta.clear();
    }
}

/// The largest datagram [`RecvBatch`] takes whole. We advertise
/// `max_udp_payload_size` = [`MAX_DATAGRAM_SIZE`], so a peer's datagrams are
/// smaller, Initials included in practice; a larger one is cut short by the
/// kernel and dropped (see [`RecvBatch::get`]).
pub const RECV_SLOT: usize = 4096;

/// Up to [`BATCH`] received datagrams, in arrival order.
#[derive(Debug)]
pub struct RecvBatch {
    bufs: Vec<u8>,
    /// Length, sender and whether the kernel cut it short, per datagram.
    meta: Vec<(usize, SocketAddr, bool)>,
}

impl Default for RecvBatch {
    fn default() -> RecvBatch {
        RecvBatch::new()
    }
}

impl RecvBatch {
    /// An empty batch.
    pub fn new() -> RecvBatch {
        RecvBatch {
            bufs: vec![0; BATCH * RECV_SLOT],
            meta: Vec::with_capacity(BATCH),
        }
    }

    /// Datagrams received.
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    /// Nothing received.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// Datagram `i`: its bytes (mutable: quiche decrypts in place), sender,
    /// and whether it was longer than [`RECV_SLOT`] (then the bytes are only
    /// its start and it must be dropped).
    pub fn get(&mut self, i: usize) -> (&mut [u8], SocketAddr, bool) {
        let (len, from, truncated) = self.meta[i];
        let start = i * RECV_SLOT;
        (&mut self.bufs[start..start + len], from, truncated)
    }
}

#[cfg(not(target_os = "linux"))]
impl RecvBatch {
    /// One `recv_from` per datagram, where there is no `recvmmsg`.
    pub(crate) fn fill_from(&mut self, socket: &mio::net::UdpSocket) -> std::io::Result<usize> {
        self.meta.clear();
        while self.meta.len() < BATCH {
            let start = self.meta.len() * RECV_SLOT;
            match socket.recv_from(&mut self.bufs[start..start + RECV_SLOT]) {
                Ok((len, from)) => self.meta.push((len, from, false)),
                Err(e) if self.meta.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(self.meta.len())
    }
}

/// `recvmmsg(2)` into `batch` (emptied first): how many datagrams arrived.
/// `WouldBlock` when there are none.
#[cfg(target_os = "linux")]
pub(crate) fn recvmmsg(fd: std::os::fd::RawFd, batch: &mut RecvBatch) -> std::io::Result<usize> {
    use std::mem::MaybeUninit;

    batch.meta.clear();
    let mut addrs: [MaybeUninit<libc::sockaddr_storage>; BATCH] =
        [const { MaybeUninit::uninit() }; BATCH];
    let mut iovs: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    let mut msgs: [MaybeUninit<libc::mmsghdr>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    let base = batch.bufs.as_mut_ptr();
    for k in 0..BATCH {
        iovs[k].write(libc::iovec {
            // SAFETY: slot k lies within `bufs` (BATCH * RECV_SLOT bytes).
            iov_base: unsafe { base.add(k * RECV_SLOT) }.cast(),
            iov_len: RECV_SLOT,
        });
        // SAFETY: an all-zero msghdr is valid; the fields used are set below.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = addrs[k].as_mut_ptr().cast();
        hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdr.msg_iov = iovs[k].as_mut_ptr();
        hdr.msg_iovlen = 1;
        msgs[k].write(libc::mmsghdr {
            msg_hdr: hdr,
            msg_len: 0,
        });
    }
    // SAFETY: every entry points at live buffers of the stated sizes.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr().cast::<libc::mmsghdr>(),
            BATCH as libc::c_uint,
            0,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = usize::try_from(r).unwrap_or(0);
    for k in 0..n {
        // SAFETY: the kernel filled the first `n` entries and their names.
        let (hdr, len) = unsafe {
            let m = msgs[k].assume_init_ref();
            (m.msg_hdr, m.msg_len as usize)
        };
        // SAFETY: the kernel wrote a socket address of the socket's family.
        let Some(from) = (unsafe { read_sockaddr(addrs[k].assume_init_ref()) }) else {
            continue;
        };
        let truncated = hdr.msg_flags & libc::MSG_TRUNC != 0;
        batch.meta.push((len.min(RECV_SLOT), from, truncated));
    }
    Ok(n)
}

/// The address in a C socket address, if it is IPv4 or IPv6.
#[cfg(target_os = "linux")]
unsafe fn read_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `sendmmsg(2)` of datagrams `from..` of `batch` on `fd`: how many the
/// kernel took (at least one), or the error for datagram `from`.
#[cfg(target_os = "linux")]
pub(crate) fn sendmmsg(
    fd: std::os::fd::RawFd,
    batch: &SendBatch,
    from: usize,
) -> std::io::Result<usize> {
    use std::mem::MaybeUninit;

    let n = batch.len() - from;
    let mut addrs: [MaybeUninit<libc::sockaddr_storage>; BATCH] =
        [const { MaybeUninit::uninit() }; BATCH];
    let mut iovs: [MaybeUninit<libc::iovec>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    let mut msgs: [MaybeUninit<libc::mmsghdr>; BATCH] = [const { MaybeUninit::uninit() }; BATCH];
    for k in 0..n {
        let (data, to) = batch.get(from + k);
        let (storage, addr_len) = sockaddr_of(to);
        addrs[k].write(storage);
        iovs[k].write(libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        });
        // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths);
        // the fields that matter are set right after.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = addrs[k].as_mut_ptr().cast();
        hdr.msg_namelen = addr_len;
        hdr.msg_iov = iovs[k].as_mut_ptr();
        hdr.msg_iovlen = 1;
        msgs[k].write(libc::mmsghdr {
            msg_hdr: hdr,
            msg_len: 0,
        });
    }
    let len = u32::try_from(n).expect("a batch is at most BATCH datagrams");
    // SAFETY: the first `n` entries of `msgs` are initialised and point at
    // `addrs`, `iovs` and the batch's buffers, all alive for the call.
    let r = unsafe {
        libc::sendmmsg(
            fd,
            msgs.as_mut_ptr().cast::<libc::mmsghdr>(),
            len,
            libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(r).unwrap_or(0).max(1))
}

/// `addr` as a C socket address and its length (for `sendmmsg`, `bind`,
/// ...).
#[cfg(target_os = "linux")]
pub fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_keep_their_datagrams_apart() {
        let mut b = SendBatch::new();
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        for i in 0..BATCH {
            let s = b.slot();
            s[0] = i as u8;
            s[1] = 0xee;
            b.push(2, a);
        }
        assert!(b.is_full());
        for i in 0..BATCH {
            assert_eq!(b.get(i), (&[i as u8, 0xee][..], a));
        }
        b.clear();
        assert!(b.is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn one_call_sends_the_batch_to_each_address() {
        use std::os::fd::AsRawFd;
        let rx4 = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind v4");
        let rx6 = std::net::UdpSocket::bind("[::1]:0").ok();
        let tx4 = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut b = SendBatch::new();
        for i in 0..5u8 {
            b.slot()[..3].copy_from_slice(&[b'd', i, 7]);
            b.push(3, rx4.local_addr().expect("addr"));
        }
        let sent = sendmmsg(tx4.as_raw_fd(), &b, 0).expect("sendmmsg");
        assert_eq!(sent, 5);
        rx4.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        for i in 0..5u8 {
            let (n, from) = rx4.recv_from(&mut buf).expect("recv");
            assert_eq!(&buf[..n], &[b'd', i, 7]);
            assert_eq!(from, tx4.local_addr().expect("addr"));
        }
        // And back in one recvmmsg, with the senders.
        let mut r = RecvBatch::new();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        for i in 0..3u8 {
            tx4.send_to(&[i; 10], rx.local_addr().expect("addr"))
                .expect("send");
        }
        tx4.send_to(&[9; RECV_SLOT + 1], rx.local_addr().expect("addr"))
            .expect("send a long one");
        std::thread::sleep(std::time::Duration::from_millis(50));
        rx.set_nonblocking(true).expect("nonblocking");
        assert_eq!(recvmmsg(rx.as_raw_fd(), &mut r).expect("recvmmsg"), 4);
        for i in 0..3u8 {
            let (data, from, cut) = r.get(usize::from(i));
            assert_eq!(
                (&*data, from, cut),
                (&[i; 10][..], tx4.local_addr().expect("addr"), false)
            );
        }
        assert!(r.get(3).2, "a datagram over RECV_SLOT is marked cut short");
        let e = recvmmsg(rx.as_raw_fd(), &mut r).expect_err("nothing left");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        if let Some(rx6) = rx6 {
            let tx6 = std::net::UdpSocket::bind("[::1]:0").expect("bind v6");
            let mut b = SendBatch::new();
            b.slot()[..2].copy_from_slice(b"v6");
            b.push(2, rx6.local_addr().expect("addr"));
            assert_eq!(sendmmsg(tx6.as_raw_fd(), &b, 0).expect("sendmmsg v6"), 1);
            rx6.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .expect("timeout");
            let (n, _) = rx6.recv_from(&mut buf).expect("recv v6");
            assert_eq!(&buf[..n], b"v6");
        }
    }
}
