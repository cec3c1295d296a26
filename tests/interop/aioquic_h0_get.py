#!/usr/bin/env python3
"""GET paths from a quic-report server over HTTP/0.9 (ALPN hq-interop), with
aioquic's own HTTP/0.9 implementation (aioquic.h0.connection.H0Connection).

One connection; each path on its own stream (`GET /path\\r\\n` + FIN). Prints
one JSON object on stdout:

    {"ok": true, "alpn": "hq-interop",
     "responses": [{"path": "/latest", "status": "complete", "body": "..."}, ...]}

plus "closed": {"code": N, "reason": "..."} when the connection was closed
(the peer's CONNECTION_CLOSE error code, or aioquic's own).

HTTP/0.9 has no status line: "status" is "complete" (the body ended with the
server's FIN), "reset" (RESET_STREAM; "code" says which) or "timeout".
Exit status: 0 if every response is complete, 1 if not, 2 without a connection.

    python aioquic_h0_get.py --port 4433 /latest /stats
"""

import argparse
import asyncio
import json
import sys
import traceback

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h0.connection import H0_ALPN, H0Connection
from aioquic.h3.events import DataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamReset


class H0Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h0 = H0Connection(self._quic)
        self.alpn = None
        self.bodies = {}
        self.waiters = {}
        self.terminated = None

    def quic_event_received(self, event: QuicEvent):
        if isinstance(event, HandshakeCompleted):
            self.alpn = event.alpn_protocol
        elif isinstance(event, StreamReset):
            self.finish(event.stream_id, {"status": "reset", "code": event.error_code})
        elif isinstance(event, ConnectionTerminated):
            self.terminated = {"code": event.error_code, "reason": event.reason_phrase}
            for sid in list(self.waiters):
                self.finish(sid, {"status": "closed", "code": event.error_code})
        for ev in self.h0.handle_event(event):
            if isinstance(ev, DataReceived):
                self.bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                if ev.stream_ended:
                    self.finish(ev.stream_id, {"status": "complete"})

    def finish(self, sid, outcome):
        waiter = self.waiters.pop(sid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    async def get(self, path, timeout):
        sid = self._quic.get_next_available_stream_id()
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[sid] = waiter
        self.h0.send_headers(sid, [(b":method", b"GET"), (b":path", path.encode())], end_stream=True)
        self.transmit()
        try:
            outcome = await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            outcome = {"status": "timeout"}
        body = bytes(self.bodies.get(sid, b""))
        return {"path": path, **outcome, "body": body.decode("utf-8", "replace")}


async def run(args, result, made):
    config = QuicConfiguration(is_client=True, alpn_protocols=H0_ALPN, server_name=args.server_name)
    config.load_verify_locations(cafile=args.ca)
    if args.cert:
        config.load_cert_chain(args.cert, args.key)
    config.idle_timeout = 2 * args.timeout
    def protocol(*a, **kw):
        made.append(H0Client(*a, **kw))
        return made[-1]

    async with connect(args.host, args.port, configuration=config, create_protocol=protocol) as c:
        result["alpn"] = c.alpn
        for path in args.paths:
            result["responses"].append(await c.get(path, args.timeout))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", default="certs/ca.pem")
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--cert", help="our client certificate (PEM), for a server with --client-ca")
    p.add_argument("--key", help="the private key of --cert")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for each response")
    p.add_argument("--deadline", type=float, default=20.0, help="seconds for the whole run")
    p.add_argument("paths", nargs="+", help="paths to GET, e.g. /latest")
    args = p.parse_args()

    result = {"ok": False, "alpn": None, "responses": []}
    made = []
    status = 0
    try:
        asyncio.run(asyncio.wait_for(run(args, result, made), args.deadline))
    except Exception as e:
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
        status = 2
    # How the connection ended, if the server closed it (its error code).
    if made and made[0].terminated is not None:
        result["closed"] = made[0].terminated
    result["ok"] = status == 0 and all(r["status"] == "complete" for r in result["responses"])
    if status == 0 and not result["ok"]:
        status = 1
    print(json.dumps(result), flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
