//! The socket side of [`Fetch`], for the client loop: one non-blocking
//! `mio::net::TcpStream` registered in the loop's `Poll` under its own
//! token, and, for a source given by host name, a short-lived lookup thread
//! per (re)connect that sends the addresses back over a channel and wakes
//! the loop's `Waker` (the loop never blocks on DNS; an IP literal needs no
//! lookup). Every method runs on the loop's thread and never blocks.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token, Waker};

use crate::fetch::{Command, Fetch, FetchEvent, FetchOptions};

/// A lookup's answer: its id and the addresses.
type Resolved = (u64, Result<Vec<SocketAddr>, String>);

/// Bytes read from the connection per `read` call.
const READ_BUF_SIZE: usize = 16 * 1024;

/// A [`Fetch`] and its connection.
#[derive(Debug)]
pub(crate) struct FetchIo {
    fetch: Fetch,
    token: Token,
    stream: Option<TcpStream>,
    /// The stream finished connecting.
    connected: bool,
    /// Counts streams opened and closed, to stop reading one that was
    /// replaced.
    generation: u64,
    waker: Arc<Waker>,
    resolved_tx: Sender<Resolved>,
    resolved_rx: Receiver<Resolved>,
    buf: Vec<u8>,
}

impl FetchIo {
    /// A fetcher whose first fetch is due at `now`; its connection will be
    /// registered under `token`, lookups wake `waker`.
    pub(crate) fn new(
        opts: &FetchOptions,
        token: Token,
        waker: Arc<Waker>,
        now: Instant,
    ) -> Result<FetchIo, String> {
        let (resolved_tx, resolved_rx) = mpsc::channel();
        Ok(FetchIo {
            fetch: Fetch::new(opts, now)?,
            token,
            stream: None,
            connected: false,
            generation: 0,
            waker,
            resolved_tx,
            resolved_rx,
            buf: vec![0; READ_BUF_SIZE],
        })
    }

    /// See [`Fetch::poll_timeout`].
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.fetch.poll_timeout()
    }

    /// See [`Fetch::is_done`].
    pub(crate) fn is_done(&self) -> bool {
        self.fetch.is_done()
    }

    /// The next sample or skipped fetch.
    pub(crate) fn poll_event(&mut self) -> Option<FetchEvent> {
        self.fetch.poll_event()
    }

    /// Starts or times out a fetch if its deadline has passed.
    pub(crate) fn handle_timeout(&mut self, reg: &Registry, now: Instant) {
        if self.fetch.poll_timeout().is_some_and(|t| t <= now) {
            self.fetch.handle_timeout(now);
            self.execute(reg, now);
        }
    }

    /// The loop's waker fired: takes lookups that finished.
    pub(crate) fn handle_woken(&mut self, reg: &Registry, now: Instant) {
        let mut any = false;
        while let Ok((id, addrs)) = self.resolved_rx.try_recv() {
            self.fetch.handle_resolved(now, id, addrs);
            any = true;
        }
        if any {
            self.execute(reg, now);
        }
    }

    /// A readiness event for the connection's token: `closed` when it said
    /// the source closed its side or the socket has an error.
    pub(crate) fn handle_ready(
        &mut self,
        reg: &Registry,
        now: Instant,
        readable: bool,
        writable: bool,
        closed: bool,
    ) {
        if self.stream.is_none() {
            return;
        }
        if !self.connected {
            match self.check_connected() {
                Ok(false) => return,
                Ok(true) => {
                    self.connected = true;
                    self.fetch.handle_connected(now);
                }
                Err(e) => self.fetch.handle_connect_failed(now, e),
            }
            self.execute(reg, now);
        } else if writable {
            self.execute(reg, now);
        }
        if (readable || closed) && self.connected {
            self.read(reg, now, closed);
        }
    }

    /// Whether the non-blocking connect finished (mio's recipe:
    /// `take_error`, then `peer_addr`).
    fn check_connected(&mut self) -> io::Result<bool> {
        let Some(s) = &self.stream else {
            return Ok(false);
        };
        if let Some(e) = s.take_error()? {
            return Err(e);
        }
        match s.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Reads until the socket is drained, the source closed it, or the
    /// fetch closed or replaced it.
    ///
    /// A read shorter than the buffer drained the socket (epoll(7): for a
    /// stream socket a short read means the data is exhausted), so no
    /// second read just to see WouldBlock, unless the event said the source
    /// closed its side (`closed`): then read on to the EOF. Data or a FIN
    /// arriving after this read is a new edge, hence a new event.
    fn read(&mut self, reg: &Registry, now: Instant, closed: bool) {
        let generation = self.generation;
        while self.generation == generation {
            let Some(s) = &mut self.stream else {
                return;
            };
            match s.read(&mut self.buf) {
                Ok(0) => {
                    self.fetch.handle_eof(now);
                    self.execute(reg, now);
                    return;
                }
                Ok(n) => {
                    self.fetch.handle_data(now, &self.buf[..n]);
                    self.execute(reg, now);
                    if n < self.buf.len() && !closed {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fetch.handle_error(now, e);
                    self.execute(reg, now);
                    return;
                }
            }
        }
    }

    /// Carries out the fetch's commands, then writes what it has to send;
    /// again while that gives it something new to say.
    fn execute(&mut self, reg: &Registry, now: Instant) {
        loop {
            while let Some(cmd) = self.fetch.poll_command() {
                match cmd {
                    Command::Close => self.close(reg),
                    Command::Connect(addr) => {
                        self.close(reg);
                        if let Err(e) = self.open(reg, addr) {
                            self.fetch.handle_connect_failed(now, e);
                        }
                    }
                    Command::Resolve { id, host, port } => self.resolve(now, id, host, port),
                }
            }
            if !self.flush(now) {
                return;
            }
        }
    }

    /// Writes the pending request bytes until done or the socket would
    /// block (the WRITABLE interest brings us back). Returns whether a
    /// write failed (the fetch then has new commands).
    fn flush(&mut self, now: Instant) -> bool {
        if !self.connected {
            return false;
        }
        let Some(s) = &mut self.stream else {
            return false;
        };
        loop {
            let pending = self.fetch.pending_send();
            if pending.is_empty() {
                return false;
            }
            match s.write(pending) {
                Ok(0) => {
                    self.fetch
                        .handle_error(now, io::ErrorKind::WriteZero.into());
                    return true;
                }
                Ok(n) => self.fetch.handle_sent(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fetch.handle_error(now, e);
                    return true;
                }
            }
        }
    }

    fn open(&mut self, reg: &Registry, addr: SocketAddr) -> io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        reg.register(&mut s, self.token, Interest::READABLE | Interest::WRITABLE)?;
        self.stream = Some(s);
        self.connected = false;
        self.generation += 1;
        Ok(())
    }

    fn close(&mut self, reg: &Registry) {
        if let Some(mut s) = self.stream.take() {
            if let Err(e) = reg.deregister(&mut s) {
                log::debug!("deregistering the source connection: {e}");
            }
            self.connected = false;
            self.generation += 1;
        }
    }

    /// Looks `host` up on a thread of its own; the answer comes back
    /// through the channel and the waker.
    fn resolve(&mut self, now: Instant, id: u64, host: String, port: u16) {
        let tx = self.resolved_tx.clone();
        let waker = Arc::clone(&self.waker);
        let spawned = thread::Builder::new()
            .name("quic-report-dns".into())
            .spawn(move || {
                let addrs = (host.as_str(), port)
                    .to_socket_addrs()
                    .map(Iterator::collect)
                    .map_err(|e| e.to_string());
                if tx.send((id, addrs)).is_ok()
                    && let Err(e) = waker.wake()
                {
                    log::warn!("cannot wake the client loop: {e}");
                }
            });
        if let Err(e) = spawned {
            self.fetch
                .handle_resolved(now, id, Err(format!("starting a lookup thread: {e}")));
        }
    }

    /// Closes the connection (the loop stops fetching).
    pub(crate) fn shutdown(&mut self, reg: &Registry) {
        self.close(reg);
    }
}
