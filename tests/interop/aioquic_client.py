#!/usr/bin/env python3
"""An aioquic client speaking quic-report/1 to a quic-report server.

Runs the cases of the README's protocol section over one connection, each on
its own stream unless said; then a second connection that resumes the first's
session with a report in 0-RTT, and a third that starts in QUIC v2 and is
moved to v1 by Version Negotiation. Prints one JSON object on stdout:

    {"ok": true, "alpn": "quic-report/1",
     "cases": [{"name": "...", "ok": true, "detail": "..."}, ...],
     "good": [<every report the server must have recorded, exactly once>]}

Exit status: 0 if every case passed, 1 if one failed, 2 if the run broke off
(e.g. the deadline). Every network wait is bounded by --timeout; the whole run
by --deadline. Cases for known server bugs run only when named with --only.

    python aioquic_client.py --port 4433 --ca certs/ca.pem
    python aioquic_client.py --port 4433 --only oversized zero_rtt
"""

import argparse
import asyncio
import json
import sys
import traceback

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.logger import QuicLogger
from aioquic.quic.packet import QuicProtocolVersion

ALPN = "quic-report/1"
CLIENT = "aioquic"
MAX_REPORT_BYTES = 64 * 1024
REPORT_TOO_LARGE = 0x10
STREAM_REJECTED = 0x11


class CaseFailed(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise CaseFailed(what)


def encode(obj) -> bytes:
    """Compact JSON in UTF-8 (not ASCII escapes: multi-byte characters travel as such)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def report(seq, **extra):
    return {"value": seq / 8, "client": CLIENT, "seq": seq, **extra}


class Stream:
    """What the server did on one stream."""

    def __init__(self):
        self.data = bytearray()
        self.fin = False
        self.stop_sending = None  # error code of the server's STOP_SENDING
        self.reset = None  # error code of the server's RESET_STREAM
        self.changed = asyncio.Event()

    def answers(self):
        """The answer lines so far, parsed; checks each ends in a newline."""
        lines = bytes(self.data).split(b"\n")
        expect(lines[-1] == b"" or not self.fin, f"answer without a final newline: {bytes(self.data)!r}")
        out = []
        for line in lines[:-1]:
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise CaseFailed(f"answer is not JSON: {line!r}: {e}")
        return out


class ReportClient(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streams = {}
        self.alpn = None
        self.handshake = None  # the HandshakeCompleted event
        self.terminated = None
        self.timeout = 5.0

    def stream(self, sid):
        return self.streams.setdefault(sid, Stream())

    def sent_stream_frames(self, sid):
        """The STREAM frames sent on sid so far (from the qlog trace)."""
        trace = self._quic.configuration.quic_logger.to_dict()["traces"][0]
        return [
            f
            for e in trace["events"]
            if e["name"] == "transport:packet_sent"
            for f in e["data"]["frames"]
            if f.get("frame_type") == "stream" and f.get("stream_id") == sid
        ]

    def quic_event_received(self, event):
        if isinstance(event, HandshakeCompleted):
            self.alpn = event.alpn_protocol
            self.handshake = event
        elif isinstance(event, StreamDataReceived):
            st = self.stream(event.stream_id)
            st.data += event.data
            st.fin = st.fin or event.end_stream
            st.changed.set()
        elif isinstance(event, StopSendingReceived):
            st = self.stream(event.stream_id)
            st.stop_sending = event.error_code
            st.changed.set()
        elif isinstance(event, StreamReset):
            st = self.stream(event.stream_id)
            st.reset = event.error_code
            st.changed.set()
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
            for st in self.streams.values():
                st.changed.set()

    # ----- helpers for the cases -----

    def open(self):
        sid = self._quic.get_next_available_stream_id()
        return sid, self.stream(sid)

    def send(self, sid, data, fin=False):
        self._quic.send_stream_data(sid, data, end_stream=fin)
        self.transmit()

    async def until(self, st, cond, what):
        """Waits (bounded) until cond() holds for stream st."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timeout
        while not cond():
            if self.terminated is not None:
                raise CaseFailed(f"connection closed while waiting for {what}: {self.terminated}")
            if st.reset is not None:
                raise CaseFailed(f"stream reset (code {st.reset:#x}) while waiting for {what}")
            left = end - loop.time()
            if left <= 0:
                raise CaseFailed(
                    f"no {what} within {self.timeout}s; got {bytes(st.data)[:300]!r} fin={st.fin} "
                    f"stop_sending={st.stop_sending}"
                )
            st.changed.clear()
            try:
                await asyncio.wait_for(st.changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def exchange(self, payload, fin=True):
        """A new stream: payload (+ FIN), then wait for the server's FIN."""
        sid, st = self.open()
        self.send(sid, payload, fin)
        await self.until(st, lambda: st.fin, "FIN from the server")
        return st


def recorded(obj):
    """What the server records and echoes: the report bound to the
    connection's identity ("" here: we have no client certificate)."""
    return {**obj, "identity": ""}


def ok_answer(obj):
    return {"ok": True, "received": recorded(obj)}


def check_single_error(st, code):
    answers = st.answers()
    expect(len(answers) == 1, f"one answer, got {answers}")
    a = answers[0]
    expect(a.get("ok") is False, f"ok:false, got {a}")
    expect(a.get("code") == code, f"code {code!r}, got {a}")
    expect(isinstance(a.get("error"), str) and a["error"], f"an error text, got {a}")
    return a


# ----- the cases -----------------------------------------------------------


async def one_report_per_stream(c, good):
    """Three reports, each on its own stream with FIN, all in flight at once."""
    sent = []
    for seq in (1, 2, 3):
        sid, st = c.open()
        obj = report(seq)
        c.send(sid, encode(obj), fin=True)
        sent.append((sid, st, obj))
    for sid, st, obj in sent:
        await c.until(st, lambda st=st: st.fin, f"FIN on stream {sid}")
        expect(st.answers() == [ok_answer(obj)], f"stream {sid}: {bytes(st.data)!r}")
        expect(st.stop_sending is None, f"stream {sid}: unexpected STOP_SENDING {st.stop_sending}")
        good.append(obj)
    return f"streams {[s for s, _, _ in sent]}"


async def several_objects_one_stream_no_fin(c, good):
    """The original Python client's style: one stream, one object at a time,
    each answer awaited before the next object is written; FIN only at the end."""
    sid, st = c.open()
    objs = [report(seq) for seq in (4, 5, 6)]
    for i, obj in enumerate(objs):
        c.send(sid, encode(obj))
        await c.until(st, lambda i=i: st.data.count(b"\n") > i, f"answer {i + 1}")
        expect(not st.fin, "the server FINed before the client did")
    expect(st.answers() == [ok_answer(o) for o in objs], f"answers: {bytes(st.data)!r}")
    c.send(sid, b"", fin=True)
    await c.until(st, lambda: st.fin, "FIN after the client's FIN")
    expect(len(st.answers()) == 3, f"no extra answer after FIN: {bytes(st.data)!r}")
    good.extend(objs)
    return f"stream {sid}"


async def back_to_back_objects_one_write(c, good):
    """Two objects and FIN in one write (whitespace between): two answers, in order."""
    objs = [report(7), report(8)]
    st = await c.exchange(encode(objs[0]) + b"\n " + encode(objs[1]))
    expect(st.answers() == [ok_answer(o) for o in objs], f"answers: {bytes(st.data)!r}")
    good.extend(objs)


async def duplicate(c, good):
    """Seq 1 again: acknowledged as a duplicate, not recorded again."""
    obj = report(1)
    st = await c.exchange(encode(obj))
    expect(
        st.answers() == [{"ok": True, "duplicate": True, "received": recorded(obj)}],
        f"answer: {bytes(st.data)!r}",
    )


BAD_INPUT = [
    # (name, bytes, code) -- each on its own stream, with FIN
    ("empty", b"", "empty"),
    ("not_utf8", b'{"value":"\xff\xfe","client":"aioquic","seq":100}', "not_utf8"),
    ("not_json", b"hello", "invalid_json"),
    ("nan", b'{"value":NaN,"client":"aioquic","seq":101}', "invalid_json"),
    ("trailing_comma", b'{"value":1,"client":"aioquic","seq":102,}', "invalid_json"),
    ("not_object_array", b"[1,2,3]", "not_object"),
    ("not_object_number", b"42", "not_object"),
    ("truncated", b'{"value":1,"client":"aioquic","seq":103', "truncated"),
    ("invalid_field_seq", b'{"value":1,"client":"aioquic","seq":"104"}', "invalid_field"),
    ("invalid_field_client", b'{"value":1,"client":42,"seq":105}', "invalid_field"),
]


def bad_input_case(payload, code):
    async def case(c, good):
        st = await c.exchange(payload)
        a = check_single_error(st, code)
        # The client had sent everything, FIN included: nothing to stop.
        expect(st.stop_sending is None, f"STOP_SENDING {st.stop_sending} after a complete stream")
        return a["error"]

    return case


async def invalid_field_stream_carries_on(c, good):
    """invalid_field is not fatal: the next object on the stream is recorded."""
    obj = report(9)
    st = await c.exchange(b'{"value":1,"client":"aioquic","seq":-9}' + encode(obj))
    answers = st.answers()
    expect(len(answers) == 2, f"two answers: {answers}")
    expect(answers[0].get("code") == "invalid_field", f"first: {answers[0]}")
    expect(answers[1] == ok_answer(obj), f"second: {answers[1]}")
    good.append(obj)


async def fatal_error_while_still_sending(c, good):
    """Not JSON, and no FIN: answer, FIN and STOP_SENDING(STREAM_REJECTED)."""
    sid, st = c.open()
    c.send(sid, b"hello ")
    await c.until(st, lambda: st.fin and st.stop_sending is not None, "FIN and STOP_SENDING")
    check_single_error(st, "invalid_json")
    expect(st.stop_sending == STREAM_REJECTED, f"STOP_SENDING {STREAM_REJECTED:#x}, got {st.stop_sending:#x}")


async def one_byte_frames(c, good):
    """One report sent one byte per STREAM frame, a transmit and a short sleep
    after each (multi-byte UTF-8 characters split too); FIN in a frame of its own."""
    obj = report(10, note="h\u00e9llo \u2713")
    payload = encode(obj)
    sid, st = c.open()
    for i in range(len(payload)):
        c.send(sid, payload[i : i + 1])
        await asyncio.sleep(0.003)
    c.send(sid, b"", fin=True)
    await c.until(st, lambda: st.fin, "FIN")
    expect(st.answers() == [ok_answer(obj)], f"answer: {bytes(st.data)!r}")
    frames = c.sent_stream_frames(sid)
    one_byte = {f["offset"] for f in frames if f["length"] == 1}
    expect(one_byte == set(range(len(payload))), f"not every byte left alone: {frames}")
    good.append(obj)
    return f"{len(payload)} bytes in {len(frames)} STREAM frames"


async def oversized(c, good):
    """An object over 64 KiB (with FIN): too_large, FIN, STOP_SENDING(REPORT_TOO_LARGE)."""
    obj = report(11, pad="x" * (MAX_REPORT_BYTES + 4096))
    sid, st = c.open()
    c.send(sid, encode(obj), fin=True)
    await c.until(st, lambda: st.fin and st.stop_sending is not None, "FIN and STOP_SENDING")
    check_single_error(st, "too_large")
    expect(st.stop_sending == REPORT_TOO_LARGE, f"STOP_SENDING {REPORT_TOO_LARGE:#x}, got {st.stop_sending:#x}")


async def key_update(c, good):
    """Two key updates (the second after the first is in use), a report after each."""
    for seq in (15, 16):
        c.request_key_update()
        obj = report(seq)
        st = await c.exchange(encode(obj))
        expect(st.answers() == [ok_answer(obj)], f"answer after a key update: {bytes(st.data)!r}")
        good.append(obj)


async def new_connection_id(c, good):
    """Five moves to a fresh connection ID of the server's (retiring the old
    one each time): the server must have issued spares and replace retired ones."""
    for seq in range(17, 22):
        old = c._quic._peer_cid.cid
        c.change_connection_id()
        expect(c._quic._peer_cid.cid != old, f"no spare connection ID left before report {seq}")
        obj = report(seq)
        st = await c.exchange(encode(obj))
        expect(st.answers() == [ok_answer(obj)], f"answer on a new connection ID: {bytes(st.data)!r}")
        good.append(obj)
    return "5 connection IDs used"


async def still_usable(c, good):
    """After all of the above, the connection still carries reports."""
    obj = report(22)
    st = await c.exchange(encode(obj))
    expect(st.answers() == [ok_answer(obj)], f"answer: {bytes(st.data)!r}")
    good.append(obj)


STREAM_CASES = (
    [
        ("one_report_per_stream", one_report_per_stream),
        ("several_objects_one_stream_no_fin", several_objects_one_stream_no_fin),
        ("back_to_back_objects_one_write", back_to_back_objects_one_write),
        ("duplicate", duplicate),
    ]
    + [(f"bad_{name}", bad_input_case(data, code)) for name, data, code in BAD_INPUT]
    + [
        ("invalid_field_stream_carries_on", invalid_field_stream_carries_on),
        ("fatal_error_while_still_sending", fatal_error_while_still_sending),
        ("one_byte_frames", one_byte_frames),
        ("oversized", oversized),
        ("key_update", key_update),
        ("new_connection_id", new_connection_id),
        ("still_usable", still_usable),
    ]
)


# ----- connections -----------------------------------------------------------


def configuration(args, **kw):
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=args.server_name, **kw)
    config.load_verify_locations(cafile=args.ca)
    config.idle_timeout = 2 * args.timeout  # also bounds a handshake nobody answers
    return config


async def stream_cases(args, result, tickets):
    """Every stream case on one connection; keeps the session tickets."""
    async with connect(
        args.host,
        args.port,
        configuration=configuration(args, quic_logger=QuicLogger()),
        create_protocol=ReportClient,
        session_ticket_handler=tickets.append,
    ) as c:
        c.timeout = args.timeout
        result["alpn"] = c.alpn
        expect(c.alpn == ALPN, f"ALPN {ALPN!r}, got {c.alpn!r}")
        for name, case in STREAM_CASES:
            if selected(args, name):
                await record(result, name, case(c, result["good"]))
        return f"ALPN {c.alpn}"


async def zero_rtt(args, result, tickets):
    """A new connection resuming the first one's session, with a report in 0-RTT."""
    expect(tickets, "the server sent no session ticket")
    config = configuration(args, session_ticket=tickets[-1])
    async with connect(
        args.host, args.port, configuration=config, create_protocol=ReportClient, wait_connected=False
    ) as c:
        c.timeout = args.timeout
        obj = report(23)
        st = await c.exchange(encode(obj))
        expect(c.handshake is not None, "no handshake")
        expect(c.handshake.session_resumed, "session not resumed")
        expect(c.handshake.early_data_accepted, "0-RTT refused")
        expect(st.answers() == [ok_answer(obj)], f"answer: {bytes(st.data)!r}")
        result["good"].append(obj)


async def version_negotiation(args, result, tickets):
    """A client that starts in QUIC v2: the server's Version Negotiation moves it to v1."""
    config = configuration(
        args,
        original_version=QuicProtocolVersion.VERSION_2,
        supported_versions=[QuicProtocolVersion.VERSION_2, QuicProtocolVersion.VERSION_1],
    )
    async with connect(args.host, args.port, configuration=config, create_protocol=ReportClient) as c:
        c.timeout = args.timeout
        obj = report(24)
        st = await c.exchange(encode(obj))
        expect(c._quic._version == QuicProtocolVersion.VERSION_1, f"version {c._quic._version:#x}")
        expect(st.answers() == [ok_answer(obj)], f"answer: {bytes(st.data)!r}")
        result["good"].append(obj)
        return "v2 -> v1"


async def reset_streams_free_their_bytes(args, result, tickets):
    """20 streams, each reset (RESET_STREAM) by the client after 60 KB of an
    unfinished object: 1.2 MB in all, over the server's 1 MiB limit of
    unanswered bytes. The client abandoned them: they must not count, so the
    connection must stay open and answer the next report."""

    async def case(c):
        for _ in range(20):
            sid, st = c.open()
            c.send(sid, b'{"value":1,"pad":"' + b"x" * 60000)
            await c.ping()  # the bytes are out (and acknowledged)
            c._quic.reset_stream(sid, 0)
            c.transmit()
        obj = report(25)
        st = await c.exchange(encode(obj))
        expect(st.answers() == [ok_answer(obj)], f"answer: {bytes(st.data)!r}")
        result["good"].append(obj)

    return await on_new_connection(args, case)


async def reset_streams_return_their_credit(args, result, tickets):
    """100 streams (the server's stream limit), each with one answered object,
    then reset by the client instead of FINed (the original Python client's
    long-lived stream, abandoned). Each must be released, so its stream
    credit comes back: a 101st stream must still be answered."""

    async def case(c):
        for i in range(100):
            sid, st = c.open()
            c.send(sid, encode(report(100 + i)))
            await c.until(st, lambda st=st: b"\n" in st.data, f"answer on stream {sid}")
            result["good"].append(report(100 + i))
            c._quic.reset_stream(sid, 0)
            c.transmit()
        obj = report(26)
        st = await c.exchange(encode(obj))
        expect(st.answers() == [ok_answer(obj)], f"answer: {bytes(st.data)!r}")
        result["good"].append(obj)

    return await on_new_connection(args, case)


async def on_new_connection(args, case):
    async with connect(args.host, args.port, configuration=configuration(args), create_protocol=ReportClient) as c:
        c.timeout = args.timeout
        try:
            return await case(c)
        except ConnectionError:
            raise CaseFailed(f"the server closed the connection: {c.terminated}")


CONNECTION_CASES = [
    ("zero_rtt", zero_rtt),
    ("version_negotiation", version_negotiation),
]
# Known server bugs: run only when named with --only (see bin/tests/interop.rs).
KNOWN_BUG_CASES = [
    ("reset_streams_free_their_bytes", reset_streams_free_their_bytes),
    ("reset_streams_return_their_credit", reset_streams_return_their_credit),
]


def selected(args, name):
    if args.only:
        return name in args.only
    return name not in dict(KNOWN_BUG_CASES)


async def record(result, name, case):
    try:
        detail = await case
        result["cases"].append({"name": name, "ok": True, "detail": detail or ""})
    except CaseFailed as e:
        result["cases"].append({"name": name, "ok": False, "detail": str(e)})
    except Exception as e:  # e.g. no connection: this case failed, the others still run
        result["cases"].append({"name": name, "ok": False, "detail": f"{type(e).__name__}: {e}"})


async def run(args, result):
    tickets = []
    if not args.only or any(name in args.only for name, _ in STREAM_CASES):
        await record(result, "connection", stream_cases(args, result, tickets))
    for name, case in CONNECTION_CASES + KNOWN_BUG_CASES:
        if selected(args, name):
            await record(result, name, case(args, result, tickets))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", default="certs/ca.pem", help="CA that signs the server's certificate")
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for each network wait")
    p.add_argument("--deadline", type=float, default=30.0, help="seconds for the whole run")
    p.add_argument("--only", nargs="*", help="run only these cases (known-bug cases run only so)")
    args = p.parse_args()

    result = {"ok": False, "alpn": None, "cases": [], "good": []}
    status = 0
    try:
        asyncio.run(asyncio.wait_for(run(args, result), args.deadline))
    except Exception as e:  # no connection, a failed first connection, or the deadline
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
        status = 2
    result["ok"] = status == 0 and bool(result["cases"]) and all(c["ok"] for c in result["cases"])
    if status == 0 and not result["ok"]:
        status = 1
    print(json.dumps(result), flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
