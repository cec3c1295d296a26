//! Raw UDP: the trivial echo server and the `--udp-echo` load generator, the
//! machine's limit for small request/response round trips that the QUIC
//! figures are compared with.
//!
//! The server is the shape of our server loop without QUIC: wait on epoll,
//! then drain the socket, echoing each datagram with one `recvfrom` and one
//! `sendto` (or, with `--echo-batch`, `recvmmsg`/`sendmmsg` of up to 64).
//! The client is the shape of the QUIC generator: C connected sockets, K
//! datagrams in flight on each, a new one sent as each comes back.

use std::collections::VecDeque;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use quic_report_mio::reuseport;
use quic_report_mio::turn::{self, Wait};

use super::{BenchArgs, CpuSample, Error, Latencies};

/// Datagrams per recvmmsg/sendmmsg.
const BATCH: usize = 64;
/// A datagram not back after this long is counted lost and replaced.
const LOSS_TIMEOUT: Duration = Duration::from_millis(500);

/// Runs an echo server on `addr` until the process is killed.
pub(super) fn serve_forever(addr: SocketAddr, batch: bool, reuseport: bool) -> Result<(), Error> {
    let sock = bind(addr, reuseport)?;
    eprintln!(
        "echo server on {} ({}{})",
        sock.local_addr()?,
        if batch {
            "recvmmsg/sendmmsg"
        } else {
            "recvfrom/sendto"
        },
        if reuseport { ", SO_REUSEPORT" } else { "" }
    );
    serve(sock, batch)
}

/// Binds a UDP socket, with SO_REUSEPORT if asked (driver-mio's bind,
/// as the server's `--reuseport` does it).
fn bind(addr: SocketAddr, reuseport: bool) -> io::Result<StdUdpSocket> {
    if reuseport {
        reuseport::bind_reuseport(addr)
    } else {
        StdUdpSocket::bind(addr)
    }
}

/// The echo loop: epoll, then drain.
fn serve(sock: StdUdpSocket, batch: bool) -> Result<(), Error> {
    sock.set_nonblocking(true)?;
    let mut sock = UdpSocket::from_std(sock);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut sock, Token(0), Interest::READABLE)?;
    let mut events = Events::with_capacity(8);
    let mut buf = vec![0u8; 2048];
    let mut mm = if batch { Some(Mmsg::new()) } else { None };
    loop {
        if !turn::poll(
            &mut poll,
            &mut events,
            Wait::new(Instant::now(), None, Duration::ZERO),
        )? {
            continue;
        }
        match &mut mm {
            Some(mm) => mm.drain(sock.as_raw_fd()),
            None => loop {
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        // A full send buffer drops the echo; the client's
                        // loss timeout replaces it.
                        let _ = sock.send_to(&buf[..n], from);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            },
        }
    }
}

/// Buffers for recvmmsg/sendmmsg.
struct Mmsg {
    bufs: Vec<[u8; 2048]>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Mmsg {
    fn new() -> Mmsg {
        // SAFETY: all-zero sockaddr_storage and mmsghdr are valid values.
        Mmsg {
            bufs: vec![[0u8; 2048]; BATCH],
            addrs: vec![unsafe { zeroed() }; BATCH],
            iovs: Vec::with_capacity(BATCH),
            hdrs: Vec::with_capacity(BATCH),
        }
    }

    fn reset(&mut self) {
        self.iovs.clear();
        self.hdrs.clear();
        for b in self.bufs.iter_mut() {
            self.iovs.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            });
        }
        for k in 0..BATCH {
            // SAFETY: an all-zero mmsghdr is valid; the pointers set below
            // point into `self`, which outlives the syscalls using them.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_name = (&raw mut self.addrs[k]).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &raw mut self.iovs[k];
            h.msg_hdr.msg_iovlen = 1;
            self.hdrs.push(h);
        }
    }

    /// Receives batches until the socket is empty, echoing each batch with
    /// one sendmmsg.
    fn drain(&mut self, fd: RawFd) {
        loop {
            self.reset();
            // SAFETY: `hdrs` holds BATCH headers pointing at live buffers.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            let n = n as usize;
            for k in 0..n {
                // Send back as many bytes as came in, to the sender.
                self.iovs[k].iov_len = self.hdrs[k].msg_len as usize;
                self.hdrs[k].msg_hdr.msg_iov = &raw mut self.iovs[k];
            }
            let mut sent = 0;
            while sent < n {
                // SAFETY: as above; the first `n` headers were filled by recvmmsg.
                let r = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.hdrs[sent..].as_mut_ptr(),
                        (n - sent) as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r <= 0 {
                    break;
                }
                sent += r as usize;
            }
            if n < BATCH {
                return;
            }
        }
    }
}

struct EchoSlot {
    sock: UdpSocket,
    /// Sent and not back: sequence number, when.
    pending: VecDeque<(u64, Instant)>,
    next: u64,
}

/// `--udp-echo`: C sockets, K in flight each, against an echo server.
pub(super) fn run_client(args: &BenchArgs) -> Result<(), Error> {
    let server = match args.echo_addr {
        Some(a) => a,
        None => {
            let sock = bind("127.0.0.1:0".parse()?, false)?;
            let addr = sock.local_addr()?;
            let batch = args.echo_batch;
            std::thread::Builder::new()
                .name("echo-server".into())
                .spawn(move || {
                    if let Err(e) = serve(sock, batch) {
                        log::error!("echo server: {e}");
                    }
                })?;
            addr
        }
    };
    let payload = usize::from(args.payload);
    let mut poll = Poll::new()?;
    let mut slots = Vec::new();
    for i in 0..args.connections as usize {
        let mut sock = UdpSocket::bind("127.0.0.1:0".parse()?)?;
        sock.connect(server)?;
        poll.registry()
            .register(&mut sock, Token(i), Interest::READABLE)?;
        slots.push(EchoSlot {
            sock,
            pending: VecDeque::new(),
            next: 0,
        });
    }
    let mut out = vec![0xabu8; payload];
    let mut buf = vec![0u8; 2048];
    // Latency stamps read the clock at each send and receive (the loop's
    // `now` can be older than a reply read in the same pass).
    let send = |s: &mut EchoSlot, i: usize, out: &mut [u8]| {
        out[..4].copy_from_slice(&(i as u32).to_le_bytes());
        out[4..12].copy_from_slice(&s.next.to_le_bytes());
        s.pending.push_back((s.next, Instant::now()));
        s.next += 1;
        // Loss (a full buffer) is caught by the loss timeout.
        let _ = s.sock.send(out);
    };
    let start = Instant::now();
    for (i, s) in slots.iter_mut().enumerate() {
        for _ in 0..args.in_flight {
            send(s, i, &mut out);
        }
    }
    let measure_start = start + args.warmup;
    let measure_end = measure_start + args.duration;
    let mut cpu_start = None;
    let (mut ops, mut errors) = (0u64, 0u64);
    let mut lat = Latencies::default();
    let mut events = Events::with_capacity(1024);
    let mut next_loss_check = start + LOSS_TIMEOUT;
    loop {
        let now = Instant::now();
        if cpu_start.is_none() && now >= measure_start {
            cpu_start = Some(CpuSample::take(args.server_pid, &args.database_pids));
        }
        if now >= measure_end || args.count.is_some_and(|n| ops >= n) {
            break;
        }
        let until = if cpu_start.is_none() {
            measure_start
        } else {
            measure_end
        }
        .min(next_loss_check);
        if !turn::poll(
            &mut poll,
            &mut events,
            Wait::new(now, Some(until), Duration::ZERO),
        )? {
            continue;
        }
        let now = Instant::now();
        let counting = cpu_start.is_some();
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(s) = slots.get_mut(i) else { continue };
            loop {
                let n = match s.sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let seq = (n >= 12)
                    .then(|| u64::from_le_bytes(buf[4..12].try_into().unwrap_or_default()));
                let echoed = n == payload && buf[..4] == (i as u32).to_le_bytes();
                let found = seq
                    .filter(|_| echoed)
                    .and_then(|q| s.pending.iter().position(|(p, _)| *p == q))
                    .and_then(|p| s.pending.remove(p));
                match found {
                    Some((_, at)) => {
                        if counting {
                            ops += 1;
                            lat.push(at.elapsed());
                        }
                        send(s, i, &mut out);
                    }
                    // Late (already replaced) or not our bytes.
                    None => errors += 1,
                }
            }
        }
        if now >= next_loss_check {
            for (i, s) in slots.iter_mut().enumerate() {
                while s
                    .pending
                    .front()
                    .is_some_and(|(_, at)| now.duration_since(*at) > LOSS_TIMEOUT)
                {
                    s.pending.pop_front();
                    errors += 1;
                    send(s, i, &mut out);
                }
            }
            next_loss_check = now + LOSS_TIMEOUT / 5;
        }
    }
    let end = Instant::now();
    let cpu_end = CpuSample::take(args.server_pid, &args.database_pids);
    let wall = end
        .duration_since(start + args.warmup)
        .as_secs_f64()
        .max(1e-9);
    let p = lat.percentiles_ms(&[0.5, 0.99]);
    println!(
        "round_trips_per_s={:.1} p50_ms={:.3} p99_ms={:.3}",
        ops as f64 / wall,
        p[0],
        p[1]
    );
    let mut detail = format!(
        "detail: mode=udp-echo connections={} in_flight={} payload={payload} wall_s={wall:.3} ops={ops} errors={errors} batch={}",
        args.connections, args.in_flight, args.echo_batch
    );
    if let Some(c) = cpu_start {
        detail.push_str(&c.detail(&cpu_end, ops));
    }
    eprintln!("{detail}");
    Ok(())
}
