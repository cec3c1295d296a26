//! HTTP/0.9 over QUIC (ALPN `hq-interop`), the server's read-only side
//! door: a stream carries one request line, `GET /path`, which the
//! application answers through `Server::respond_request` (the body, then
//! FIN). Anything else is answered `bad request` at once. The answers go
//! out through the same slots as reports (one slot per stream).

use std::collections::VecDeque;

use super::table::Conn;
use super::{ConnKey, ReportHandle, ServerEvent, Slot, StreamState, refuse_unless_client_bidi};
use crate::config::codes;

/// Longest HTTP/0.9 request line we read.
const MAX_REQUEST_BYTES: usize = 4096;

/// Requests of one connection in the application's hands at a time. A body
/// is built whole before it is handed over (up to 12 MiB for `/latest`),
/// so 100 streams of `GET /latest` in one datagram would have the
/// application build 100 of them; the others wait in quiche, unread, until
/// one is answered (`Server::respond_request` comes back here).
const MAX_REQUESTS_IN_HAND: usize = 4;

/// Reads the request line of the readable streams of `conn` (up to FIN,
/// or [`MAX_REQUEST_BYTES`]) and hands `GET /path` to the application as
/// [`ServerEvent::Request`], [`MAX_REQUESTS_IN_HAND`] at a time.
pub(super) fn read_requests(
    key: ConnKey,
    conn: &mut Conn,
    scratch: &mut [u8],
    events: &mut VecDeque<ServerEvent>,
) {
    let peer = conn.peer;
    let Some(identity) = conn.identity.clone() else {
        return; // never read before the identity is settled
    };
    let mut in_hand = conn
        .streams
        .values()
        .filter(|st| matches!(st.slots.front(), Some(Slot::Pending(_))))
        .count();
    for sid in conn.quic.readable() {
        if in_hand >= MAX_REQUESTS_IN_HAND {
            break;
        }
        if refuse_unless_client_bidi(&mut conn.quic, sid) {
            continue;
        }
        let st = conn.streams.entry(sid).or_insert_with(|| {
            let mut st = StreamState::new(0);
            st.request = Some(Vec::new());
            st
        });
        let Some(req) = st.request.as_mut() else {
            continue;
        };
        let mut too_long = false;
        while !st.read_done {
            // At most one byte past the limit: a read may return as much as
            // `scratch` holds (64 KiB, out-of-order data made contiguous).
            let room = (MAX_REQUEST_BYTES + 1 - req.len()).min(scratch.len());
            match conn.quic.stream_recv(sid, &mut scratch[..room]) {
                Ok((n, fin)) => {
                    req.extend_from_slice(&scratch[..n]);
                    st.read_done = fin;
                    if req.len() > MAX_REQUEST_BYTES {
                        too_long = true;
                        break;
                    }
                }
                Err(quiche::Error::Done) => break,
                Err(_) => st.read_done = true,
            }
        }
        if !st.read_done && !too_long {
            continue;
        }
        if st.next_index > 0 {
            continue; // answered already
        }
        st.next_index = 1;
        if !st.read_done {
            let _ = conn
                .quic
                .stream_shutdown(sid, quiche::Shutdown::Read, codes::STREAM_REJECTED);
            st.read_done = true;
        }
        // The line is read: its bytes go now (the stream may wait long for
        // its answer).
        let req = std::mem::take(req);
        match parse_request(&req) {
            Some(path) => {
                st.slots.push_back(Slot::Pending(0));
                in_hand += 1;
                let handle = ReportHandle {
                    conn: key,
                    stream: sid,
                    index: 0,
                };
                events.push_back(ServerEvent::Request {
                    handle,
                    peer,
                    path,
                    identity: identity.clone(),
                });
            }
            None => {
                let answer = b"bad request: expected GET /path\n".to_vec();
                st.ready_bytes += answer.len();
                st.slots.push_back(Slot::Ready(answer));
            }
        }
    }
}

/// `GET /path` (with `\r\n`, `\n` or nothing after it) -> the path, without a
/// query string.
fn parse_request(req: &[u8]) -> Option<String> {
    let line = std::str::from_utf8(req).ok()?;
    let line = line.lines().next()?.trim_end();
    let mut words = line.split(' ');
    let (method, target) = (words.next()?, words.next()?);
    if method != "GET"
        || !target.starts_with('/')
        || words.next().is_some_and(|w| !w.starts_with("HTTP/"))
    {
        return None;
    }
    Some(target.split('?').next().unwrap_or(target).to_owned())
}
