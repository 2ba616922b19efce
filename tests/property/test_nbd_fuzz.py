"""Fuzzing the NBD handshake and transmission phases.

Invariants (h11's fuzz rule, adapted): any byte stream either parses or raises NBDProtocolError,
never anything else; the export server survives every client stream without an unexpected
exception, finishes within its timeouts, and changes no byte of the export that an
acknowledged write/zero/trim did not cover (and never grows or shrinks it).

CI=true runs at least 10,000 inputs per test; a local run uses fewer to stay fast.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockmirror.daemon import Daemon
from blockmirror.export import nbd_server as ns
from blockmirror.nbd.constants import (
    NBD_INIT_MAGIC,
    NBD_OPTS_MAGIC,
    NBD_REP_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    Cmd,
    Opt,
    Rep,
    TransmissionFlag,
)
from blockmirror.nbd.handshake import ExportInfo, ServerHandshake, meta_payload
from blockmirror.nbd.handshake_client import ClientHandshake
from blockmirror.nbd.transmission import ReplyDecoder, RequestDecoder
from blockmirror.nbd.wire import NBDProtocolError
from nbd_helpers import RamDriver, SocketClient, ram_node

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
EXAMPLES = 10_000 if IN_CI else 400
SIZE = 256 * 1024

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not IN_CI,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

u32 = st.integers(0, 2**32 - 1)


def _opt(opt: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">QII", NBD_OPTS_MAGIC, opt,
                       len(payload) if length is None else length) + payload


def _name_payload(name: bytes, infos: list[int]) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


options = st.one_of(
    st.builds(_opt, st.sampled_from(list(Opt)) | u32, st.binary(max_size=40)),
    st.builds(lambda n, i: _opt(Opt.GO, _name_payload(n, i)),
              st.sampled_from([b"disk", b"", b"nope"]), st.lists(st.integers(0, 5), max_size=3)),
    st.builds(lambda n, i: _opt(Opt.INFO, _name_payload(n, i)),
              st.sampled_from([b"disk", b"x"]), st.lists(st.integers(0, 5), max_size=3)),
    st.just(_opt(Opt.STRUCTURED_REPLY, b"")),
    st.builds(lambda o, q: _opt(o, meta_payload("disk", q)),
              st.sampled_from([Opt.SET_META_CONTEXT, Opt.LIST_META_CONTEXT]),
              st.lists(st.sampled_from(["base:allocation", "base:", "qemu:x", ""]), max_size=3)),
    st.just(_opt(Opt.LIST, b"")),
    st.builds(lambda p, n: _opt(Opt.EXPORT_NAME, p, n), st.sampled_from([b"disk", b"no"]),
              st.sampled_from([None, 0, 2, 5000])),
    st.binary(min_size=1, max_size=24),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    cmd = draw(st.sampled_from(list(Cmd)) | st.integers(0, 0xFFFF))
    flags = draw(st.sampled_from([0, 1, 2, 4, 8, 16]) | st.integers(0, 0xFFFF))
    offset = draw(st.sampled_from([0, 512, SIZE - 1, SIZE, SIZE + 4096, 2**63]) | st.integers(
        0, 2**64 - 1))
    length = draw(st.sampled_from([0, 1, 512, 4096, 65536, SIZE]) | st.integers(0, 2**32 - 1))
    magic = draw(st.sampled_from([NBD_REQUEST_MAGIC] * 20 + [0]))
    cookie = draw(st.integers(0, 2**64 - 1))
    head = struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)
    if cmd == Cmd.WRITE and length <= SIZE:
        fill = draw(st.binary(min_size=1, max_size=1)) * length
        return head + fill
    return head


@st.composite
def good_requests(draw: st.DrawFn) -> bytes:
    """Mostly valid requests, so that many examples really read and write the export."""
    cmd = draw(st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM,
                                Cmd.FLUSH, Cmd.BLOCK_STATUS, Cmd.CACHE]))
    flags = draw(st.sampled_from([0, 0, 1, 2, 4, 8, 16, 3]))
    offset = draw(st.integers(0, SIZE))
    length = draw(st.integers(0, min(SIZE - offset + 8, 70000)))
    head = struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, 0, offset, length)
    if cmd == Cmd.WRITE:
        return head + draw(st.binary(min_size=1, max_size=1)) * length
    return head


def _go_stream(structured: bool) -> bytes:
    out = struct.pack(">I", 3)
    if structured:
        out += _opt(Opt.STRUCTURED_REPLY, b"") + _opt(
            Opt.SET_META_CONTEXT, meta_payload("disk", ["base:allocation"]))
    return out + _opt(Opt.GO, _name_payload(b"disk", [3]))


class _Catalog:
    def find_export(self, name: str) -> ExportInfo | None:
        return ExportInfo("disk", SIZE, TransmissionFlag(0x1FF)) if name == "disk" else None

    def list_exports(self) -> list[ExportInfo]:
        return [ExportInfo("disk", SIZE, TransmissionFlag(0x1FF))]


# --- sans-IO parsers -------------------------------------------------------------------------


@FUZZ
@given(cflags=st.sampled_from([1, 3, 0]) | u32, opts=st.lists(options, max_size=8),
       tail=st.binary(max_size=64), split=st.integers(1, 64))
def test_server_handshake_parses_or_raises_protocol_error(
    cflags: int, opts: list[bytes], tail: bytes, split: int
) -> None:
    hs = ServerHandshake(_Catalog(), tls_offered=bool(cflags & 4))
    stream = struct.pack(">I", cflags) + b"".join(opts) + tail
    try:
        for i in range(0, len(stream), split):
            hs.receive_data(stream[i : i + split])
            for _ in range(len(stream) + 2):  # each step consumes bytes or stops
                if hs.next_event() is None or hs.state in ("READY", "DEAD"):
                    break
                if hs.state == "NEWSTYLE.OPT_STARTTLS.WAIT":
                    hs.tls_established()
            if hs.state in ("READY", "DEAD"):
                break
    except NBDProtocolError:
        return
    # every reply the server wrote is well framed
    out = hs.data_to_send()
    pos = 18
    while pos < len(out) and hs.state != "READY":
        magic, _, rep, n = struct.unpack_from(">QIII", out, pos)
        assert magic == NBD_REP_MAGIC
        assert rep in set(Rep)
        pos += 20 + n


@st.composite
def server_replies(draw: st.DrawFn) -> bytes:
    parts = [struct.pack(">QQH", draw(st.sampled_from([NBD_INIT_MAGIC] * 9 + [0])),
                         NBD_OPTS_MAGIC, draw(st.sampled_from([1, 3, 0])))]
    for _ in range(draw(st.integers(0, 8))):
        opt = draw(st.sampled_from([Opt.STARTTLS, Opt.STRUCTURED_REPLY, Opt.SET_META_CONTEXT,
                                    Opt.GO, Opt.LIST]) | u32)
        rep = draw(st.sampled_from(list(Rep)) | u32)
        payload = draw(st.binary(max_size=20) | st.sampled_from([
            struct.pack(">HQH", 0, 4096, 1), struct.pack(">HIII", 3, 1, 4096, 1 << 25),
            struct.pack(">I", 0) + b"base:allocation"]))
        parts.append(struct.pack(">QIII", NBD_REP_MAGIC, opt, rep, len(payload)) + payload)
    parts.append(draw(st.binary(max_size=40)))
    return b"".join(parts)


@FUZZ
@given(stream=server_replies(), tls=st.booleans(), listing=st.booleans())
def test_client_handshake_parses_or_raises_protocol_error(
    stream: bytes, tls: bool, listing: bool
) -> None:
    hs = ClientHandshake("disk", tls=tls, list_exports=listing)
    hs.receive_data(stream)
    try:
        for _ in range(len(stream) + 2):
            ev = hs.next_event()
            if ev is None or hs.state in ("READY", "DEAD"):
                break
            if hs.state == "NEWSTYLE.OPT_STARTTLS.HANDSHAKE":
                hs.tls_established()
    except NBDProtocolError:
        pass


@FUZZ
@given(stream=st.lists(requests() | st.binary(max_size=30), max_size=6))
def test_request_decoder_parses_or_raises(stream: list[bytes]) -> None:
    dec = RequestDecoder()
    dec.receive_data(b"".join(stream))
    try:
        while dec.next_request() is not None:
            pass
    except NBDProtocolError:
        pass


@FUZZ
@given(stream=st.binary(max_size=200), cookies=st.dictionaries(u32, st.integers(0, 64)))
def test_reply_decoder_parses_or_raises(stream: bytes, cookies: dict[int, int]) -> None:
    magics = [NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC]
    dec = ReplyDecoder(cookies.get)
    for magic in magics:
        dec.receive_data(struct.pack(">I", magic) + stream)
    try:
        while dec.next_reply() is not None:
            pass
    except NBDProtocolError:
        pass


# --- the export server, fed whole client streams ---------------------------------------------


def _run(coro: Any) -> Any:
    """One event loop for all examples: a fresh loop per example costs more than the example."""
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(coro)


_LOOP: asyncio.AbstractEventLoop | None = None


def _transmission_replies(out: bytes) -> bytes:
    """Strip the greeting and the option replies (and an EXPORT_NAME answer) from ``out``."""
    pos = 18
    while pos + 20 <= len(out) and struct.unpack_from(">Q", out, pos)[0] == NBD_REP_MAGIC:
        pos += 20 + struct.unpack_from(">I", out, pos + 16)[0]
    if pos + 4 <= len(out) and struct.unpack_from(">I", out, pos)[0] not in (
            NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC):
        pos += 10  # the NBD_OPT_EXPORT_NAME reply (NO_ZEROES negotiated)
    return out[pos:]


def _acked(out: bytes, sent: dict[int, tuple[int, int, int]]) -> set[int]:
    """Cookies the server answered with success; fails on any malformed reply."""
    def read_length(cookie: int) -> int | None:
        req = sent.get(cookie)
        if req is None:
            return None
        return req[2] if req[0] == Cmd.READ else 0

    dec = ReplyDecoder(read_length)
    dec.receive_data(_transmission_replies(out))
    ok: set[int] = set()
    failed: set[int] = set()
    while (r := dec.next_reply()) is not None:
        if getattr(r, "error", 0):
            failed.add(r.cookie)
        elif getattr(r, "done", True):
            ok.add(r.cookie)
    return ok - failed


@FUZZ
@given(structured=st.booleans(), prefix=st.lists(options, max_size=2),
       reqs=st.lists(good_requests() | requests(), max_size=8), junk=st.binary(max_size=16),
       writable=st.booleans())
def test_export_server_survives_any_client_stream(
    structured: bool, prefix: list[bytes], reqs: list[bytes], junk: bytes, writable: bool
) -> None:
    stream = bytearray()
    sent: dict[int, tuple[int, int, int]] = {}
    for k, raw in enumerate(reqs):
        req = bytearray(raw)
        req[8:16] = struct.pack(">Q", k + 1)  # unique cookies: replies match requests
        _, _, cmd, _, off, n = struct.unpack_from(">IHHQQI", req)
        sent[k + 1] = (cmd, off, n)
        stream += req
    handshake = _go_stream(structured)
    client_bytes = handshake[:4] + b"".join(prefix) + handshake[4:] + bytes(stream) + junk

    async def main() -> tuple[bytes, bytes, bytes, bool]:
        d = Daemon()
        node = ram_node(d.graph, "n0", SIZE)
        drv = node.driver
        assert isinstance(drv, RamDriver)
        drv.data[:] = bytes(range(1, 256)) * (SIZE // 255) + bytes(range(1, SIZE % 255 + 1))
        drv.allocated.update(range(0, SIZE // 65536, 2))
        before = bytes(drv.data)
        server = ns.NbdServer(d.graph, d.events, handshake_timeout=2.0)
        server.add_export("e0", node, name="disk", description="", writable=writable)
        conn = SocketClient(server)
        await conn.start()
        await conn.send(client_bytes)
        out = await conn.finish(10)  # no hang beyond the timeouts; the server hung up
        return before, bytes(drv.data), out, conn.client.crashed

    before, after, out, crashed = _run(main())
    assert not crashed
    assert len(after) == SIZE  # nothing written past the end of the export
    acked = _acked(out, sent)
    covered = [(sent[c][1], sent[c][2]) for c in acked
               if sent[c][0] in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM)]
    for sector in range(0, SIZE, 512):
        if before[sector : sector + 512] == after[sector : sector + 512]:
            continue
        for i in range(sector, sector + 512):
            if before[i] != after[i]:
                assert any(o <= i < o + n for o, n in covered), f"byte {i} changed unasked"
