"""Harness: our NBD server (export) against any client byte stream, handshake included.

The fuzzer's bytes pick a handshake (fixed newstyle with or without structured replies and
meta contexts, or raw bytes), then requests (mostly well-formed headers with fuzzed fields,
WRITE payloads included) and trailing junk. The stream is fed to a real server connection
(export/nbd_server.py's client task) over a socket pair, on a 256 KiB RAM node.

Invariants: the connection task never crashes (client.crashed), finishes within its time
limits, the export keeps its size, and no byte changes unless an acknowledged
WRITE/WRITE_ZEROES/TRIM covered it.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from blockmirror.daemon import Daemon
from blockmirror.export import nbd_server as ns
from blockmirror.nbd.constants import (
    NBD_OPTS_MAGIC,
    NBD_REP_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    Cmd,
    Opt,
)
from blockmirror.nbd.handshake import meta_payload
from blockmirror.nbd.transmission import ReplyDecoder
from fuzz.common import Finding, run
from fuzz.provider import Input
from nbd_helpers import RamDriver, SocketClient, ram_node

SIZE = 256 * 1024
#: the export's contents before each input: no zero byte, so a zeroed byte shows
PATTERN = bytes(range(1, 256)) * (SIZE // 255) + bytes(range(1, SIZE % 255 + 1))
DICT = [struct.pack(">Q", NBD_OPTS_MAGIC), struct.pack(">I", NBD_REQUEST_MAGIC), b"disk",
        b"base:allocation", b"qemu:dirty-bitmap:", b"\0\0\0\x03"]


def _opt(opt: int, payload: bytes) -> bytes:
    return struct.pack(">QII", NBD_OPTS_MAGIC, opt, len(payload)) + payload


def _go(name: bytes, infos: list[int]) -> bytes:
    return _opt(Opt.GO, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))


def _handshake(inp: Input) -> tuple[bytes, bool]:
    kind = inp.below(8)
    flags = struct.pack(">I", inp.pick([3, 3, 3, 1, 0, inp.int(4)]))
    if kind == 0:
        return flags + inp.bytes(inp.below(128)), False
    out = flags
    structured = inp.below(3) != 0
    for _ in range(inp.below(3)):  # extra options first
        out += _opt(inp.pick(list(Opt)) if inp.below(4) else inp.int(4),
                    inp.bytes(inp.below(40)))
    if structured:
        out += _opt(Opt.STRUCTURED_REPLY, b"")
        if inp.bool():
            out += _opt(Opt.SET_META_CONTEXT, meta_payload(
                "disk", [inp.pick(["base:allocation", "qemu:allocation-depth", "base:"])]))
    if kind == 1:
        name = b"disk"
        return out + struct.pack(">QII", NBD_OPTS_MAGIC, Opt.EXPORT_NAME, len(name)) + name, \
            False
    return out + _go(inp.pick([b"disk", b"disk", b"nope", b""]),
                     [inp.below(6) for _ in range(inp.below(3))]), structured


def _requests(inp: Input) -> tuple[bytes, dict[int, tuple[int, int, int]]]:
    out = bytearray()
    sent: dict[int, tuple[int, int, int]] = {}
    for k in range(inp.below(10)):
        cmd = inp.pick([Cmd.READ, Cmd.WRITE, Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.FLUSH,
                        Cmd.BLOCK_STATUS, Cmd.CACHE, Cmd.DISC]) if inp.below(8) else inp.int(2)
        flags = inp.pick([0, 0, 1, 2, 4, 8, 16]) if inp.below(4) else inp.int(2)
        offset = inp.below(SIZE + 1) if inp.below(4) else inp.int(8)
        length = inp.below(70000) if inp.below(4) else inp.int(4)
        magic = NBD_REQUEST_MAGIC if inp.below(32) else inp.int(4)
        cookie = k + 1
        sent[cookie] = (cmd, offset, length)
        out += struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)
        if cmd == Cmd.WRITE and length <= 70000:
            fill = inp.bytes(1) or b"\x5a"
            out += fill * length if inp.below(8) else fill * inp.below(length + 1)
    return bytes(out), sent


def _transmission(out: bytes, no_zeroes: bool) -> bytes:
    pos = 18
    while pos + 20 <= len(out) and struct.unpack_from(">Q", out, pos)[0] == NBD_REP_MAGIC:
        pos += 20 + struct.unpack_from(">I", out, pos + 16)[0]
    if pos + 4 <= len(out) and struct.unpack_from(">I", out, pos)[0] not in (
            NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC):
        pos += 10 if no_zeroes else 134  # the EXPORT_NAME reply, 124 zeroes without NO_ZEROES
    return out[pos:]


def _acked(out: bytes, sent: dict[int, tuple[int, int, int]], no_zeroes: bool) -> set[int]:
    def read_length(cookie: int) -> int | None:
        req = sent.get(cookie)
        if req is None:
            return None
        return req[2] if req[0] == Cmd.READ else 0

    dec = ReplyDecoder(read_length)
    dec.receive_data(_transmission(out, no_zeroes))
    ok: set[int] = set()
    failed: set[int] = set()
    try:
        while (r := dec.next_reply()) is not None:
            if getattr(r, "error", 0):
                failed.add(r.cookie)
            elif getattr(r, "done", True):
                ok.add(r.cookie)
    except Exception:  # a reply stream cut short by a hang-up: what parsed counts
        pass
    return ok - failed


async def _serve(stream: bytes, writable: bool) -> tuple[bytes, bytes, bytes, bool]:
    d = Daemon()
    node = ram_node(d.graph, "n0", SIZE)
    drv = node.driver
    assert isinstance(drv, RamDriver)
    drv.data[:] = PATTERN
    drv.allocated.update(range(0, SIZE // 65536, 2))
    before = PATTERN
    server = ns.NbdServer(d.graph, d.events, handshake_timeout=2.0)
    server.add_export("e0", node, name="disk", description="", writable=writable)
    conn = SocketClient(server)
    await conn.start()
    await conn.send(stream)
    out = await conn.finish(20)
    return before, bytes(drv.data), out, conn.client.crashed


def one_input(data: bytes) -> None:
    inp = Input(data)
    writable = inp.below(4) != 0
    hs, _ = _handshake(inp)
    reqs, sent = _requests(inp)
    stream = hs + reqs + inp.rest()
    before, after, out, crashed = run(_serve(stream, writable), 20)
    if crashed:
        raise Finding("the connection task crashed")
    if len(after) != SIZE:
        raise Finding("the export changed size")
    if before == after:
        return
    acked = _acked(out, sent, bool(hs[3] & 2) if len(hs) >= 4 else False)
    covered = [(sent[c][1], sent[c][2]) for c in acked
               if sent[c][0] in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM)]
    check_changes(before, after, covered)


def check_changes(before: bytes, after: bytes, covered: list[tuple[int, int]]) -> None:
    """Every byte that differs lies in one of the ``covered`` (offset, length) ranges."""
    mask = bytearray(len(before))  # 1 where an acknowledged request may have changed bytes
    for o, n in covered:
        if o < len(before) and n > 0:
            end = min(len(before), o + n)
            mask[o:end] = b"\1" * (end - o)
    for block in range(0, len(before), 4096):  # compare blocks, then a changed one's bytes
        if before[block:block + 4096] == after[block:block + 4096]:
            continue
        for i in range(block, min(len(before), block + 4096)):
            if before[i] != after[i] and not mask[i]:
                raise Finding(f"byte {i} changed without an acknowledged write")
