#!/usr/bin/env python3
"""An aioquic server speaking quic-report/1, for our client to report to.

Parses the JSON objects of every client-initiated bidirectional stream,
appends each report to --records as one JSON line (flushed before the
answer), answers {"ok":true,"received":<obj>}\\n per object, and FINs its
side once the client's FIN has arrived. Stdout carries JSON lines:

    {"event": "listening", "addr": "127.0.0.1:PORT"}
    {"event": "connection", "conn": 1, "alpn": "quic-report/1"}
    {"event": "stream", "conn": 1, "stream": 0, "objects": 1, "fin": true}
    {"event": "stop_sending", "conn": 1, "stream": 0, "code": 0}

Logs go to stderr. Stops on SIGTERM/SIGINT or after --lifetime seconds.

    python aioquic_server.py --cert certs/localhost.pem --key certs/localhost.key --records out.jsonl
"""

import argparse
import asyncio
import itertools
import json
import signal
import sys

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)

ALPN = "quic-report/1"
MAX_STREAM_BYTES = 1024 * 1024
conn_ids = itertools.count(1)


def say(**event):
    print(json.dumps(event), flush=True)


def log(msg):
    print(f"aioquic_server: {msg}", file=sys.stderr, flush=True)


def answer(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class StreamState:
    def __init__(self):
        self.buf = bytearray()
        self.objects = 0
        self.fin = False
        self.closed = False  # our side FINed (or gave up)


class ReportServer(QuicConnectionProtocol):
    records = None  # path, set in main()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = next(conn_ids)
        self.streams = {}
        self.decoder = json.JSONDecoder()

    def quic_event_received(self, event):
        if isinstance(event, HandshakeCompleted):
            say(event="connection", conn=self.conn, alpn=event.alpn_protocol)
        elif isinstance(event, StreamDataReceived):
            self.on_data(event.stream_id, event.data, event.end_stream)
        elif isinstance(event, StopSendingReceived):
            say(event="stop_sending", conn=self.conn, stream=event.stream_id, code=event.error_code)
        elif isinstance(event, StreamReset):
            say(event="reset", conn=self.conn, stream=event.stream_id, code=event.error_code)
        elif isinstance(event, ConnectionTerminated):
            log(f"conn {self.conn} closed: code {event.error_code:#x} {event.reason_phrase!r}")

    def on_data(self, sid, data, fin):
        if sid % 4 != 0:
            log(f"conn {self.conn}: data on stream {sid}, which is not client bidirectional")
            return
        st = self.streams.setdefault(sid, StreamState())
        if st.closed:
            return
        st.buf += data
        st.fin = st.fin or fin
        for reply in self.take_objects(st):
            self.reply(sid, st, reply)
        if len(st.buf) > MAX_STREAM_BYTES:
            self.reply(sid, st, {"ok": False, "code": "too_large", "error": "object too large"}, fin=True)
        elif st.fin and not st.closed:
            if st.buf.strip():
                self.reply(sid, st, {"ok": False, "code": "truncated", "error": "FIN inside an object"}, fin=True)
            elif st.objects == 0:
                self.reply(sid, st, {"ok": False, "code": "empty", "error": "FIN before any object"}, fin=True)
            else:
                self.reply(sid, st, None, fin=True)
            say(event="stream", conn=self.conn, stream=sid, objects=st.objects, fin=True)

    def take_objects(self, st):
        """Answers for every complete object at the front of st.buf (consumed)."""
        while True:
            rest = bytes(st.buf).lstrip()
            if not rest:
                st.buf.clear()
                return
            try:
                text = rest.decode("utf-8")
            except UnicodeDecodeError as e:
                if not st.fin and e.start >= len(rest) - 3:
                    return  # a character split across frames: wait for the rest
                st.buf.clear()
                yield {"ok": False, "code": "not_utf8", "error": str(e)}
                return
            try:
                obj, end = self.decoder.raw_decode(text)
            except json.JSONDecodeError:
                return  # incomplete (or bad: then FIN says so)
            st.buf[:] = text[end:].encode("utf-8")
            st.objects += 1
            if not isinstance(obj, dict):
                yield {"ok": False, "code": "not_object", "error": f"got {type(obj).__name__}"}
                continue
            with open(self.records, "a", encoding="utf-8") as f:
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                f.flush()
            yield {"ok": True, "received": obj}

    def reply(self, sid, st, obj, fin=False):
        if st.closed:
            return
        data = answer(obj) if obj is not None else b""
        try:
            self._quic.send_stream_data(sid, data, end_stream=fin)
        except Exception as e:  # e.g. the client stopped reading
            log(f"conn {self.conn} stream {sid}: cannot send: {e}")
            st.closed = True
            return
        st.closed = fin
        self.transmit()


async def run(args):
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    config.load_cert_chain(args.cert, args.key)
    ReportServer.records = args.records
    server = await serve(args.host, args.port, configuration=config, create_protocol=ReportServer)
    host, port = server._transport.get_extra_info("sockname")[:2]  # the port, when --port 0
    say(event="listening", addr=f"{host}:{port}")
    log(f"listening on {host}:{port}, records to {args.records}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.lifetime)
        log("stopping on a signal")
    except asyncio.TimeoutError:
        log(f"stopping after --lifetime {args.lifetime}s")
    server.close()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="UDP port (0: any free one, printed)")
    p.add_argument("--cert", default="certs/localhost.pem")
    p.add_argument("--key", default="certs/localhost.key")
    p.add_argument("--records", required=True, help="file the reports are appended to, one JSON line each")
    p.add_argument("--lifetime", type=float, default=60.0, help="exit after this many seconds")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
