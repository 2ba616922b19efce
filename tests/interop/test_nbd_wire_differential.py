"""Wire-level differential test of the transmission phase: qemu-storage-daemon 7.2 vs ours.

The same raw requests (valid and invalid: past EOF, bad flags, unknown commands, zero lengths,
read-only exports, DF, REQ_ONE, ...) go to a QSD export and to ours, both over a file node on
identical images, with simple and with structured replies; the decoded replies (error numbers,
error messages, chunk types, block-status extents) must be equal.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import pytest

from blockmirror.block.options import open_blockdev
from blockmirror.daemon import Daemon
from blockmirror.nbd.constants import (
    NBD_OPTS_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Opt,
    Rep,
)
from blockmirror.nbd.handshake import meta_payload
from blockmirror.qmp.commands import nbd as nq
from conftest import require_tool
from nbd_helpers import peer

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 4 * MiB

REQUESTS: list[tuple[str, int, int, int, int]] = [
    ("read", Cmd.READ, 0, 0, 512),
    ("read in a hole", Cmd.READ, 0, 2 * MiB, 4096),
    ("read across data and hole", Cmd.READ, 0, 65536 - 512, 4096),
    ("read DF", Cmd.READ, CmdFlag.DF, 2 * MiB, 4096),
    ("read zero length", Cmd.READ, 0, 0, 0),
    ("read past EOF", Cmd.READ, 0, SIZE, 512),
    ("read with a bad flag", Cmd.READ, CmdFlag.NO_HOLE, 0, 512),
    ("write", Cmd.WRITE, CmdFlag.FUA, 4096, 512),
    ("write past EOF", Cmd.WRITE, 0, SIZE - 2, 4),
    ("unknown command", 42, 0, 0, 512),
    ("resize", Cmd.RESIZE, 0, 0, 0),
    ("trim past EOF", Cmd.TRIM, 0, SIZE, 512),
    ("trim", Cmd.TRIM, 0, 3 * MiB, 65536),
    ("write zeroes, fast", Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, 2 * MiB, 4096),
    ("write zeroes, no hole", Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, 2 * MiB + 65536, 4096),
    ("block status, zero length", Cmd.BLOCK_STATUS, 0, 0, 0),
    ("block status", Cmd.BLOCK_STATUS, 0, 0, MiB),
    ("block status, one extent", Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, MiB),
    ("cache past EOF", Cmd.CACHE, 0, SIZE, 1),
    ("cache", Cmd.CACHE, 0, 0, 4096),
    ("flush", Cmd.FLUSH, 0, 0, 0),
]


def _opt(o: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", NBD_OPTS_MAGIC, o, len(payload)) + payload


def _go(name: str) -> bytes:
    raw = name.encode()
    return _opt(Opt.GO, struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, 3))


async def probe(path: str, export: str, structured: bool) -> list[Any]:
    """Negotiate, send every request one at a time, decode each reply."""
    r, w = await asyncio.open_unix_connection(path)
    try:
        await r.readexactly(18)
        hs = struct.pack(">I", 3)
        if structured:
            hs += _opt(Opt.STRUCTURED_REPLY) + _opt(
                Opt.SET_META_CONTEXT, meta_payload(export, ["base:allocation"]))
        w.write(hs + _go(export))
        while True:
            _, o, rep, n = struct.unpack(">QIII", await r.readexactly(20))
            await r.readexactly(n)
            if o == Opt.GO and rep == Rep.ACK:
                break
        out: list[Any] = []
        for cookie, (name, cmd, flags, off, n) in enumerate(REQUESTS):
            data = b"w" * n if cmd == Cmd.WRITE else b""
            w.write(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie, off, n) + data)
            await w.drain()
            out.append((name, await asyncio.wait_for(_reply(r, cmd, n), 5)))
        return out
    finally:
        w.close()


async def _reply(r: asyncio.StreamReader, cmd: int, n: int) -> Any:
    (magic,) = struct.unpack(">I", await r.readexactly(4))
    if magic == NBD_SIMPLE_REPLY_MAGIC:
        err, _ = struct.unpack(">IQ", await r.readexactly(12))
        if err == 0 and cmd == Cmd.READ:
            await r.readexactly(n)
        return ("simple", err)
    chunks: list[Any] = []
    while True:
        assert magic == NBD_STRUCTURED_REPLY_MAGIC
        flags, typ, _, length = struct.unpack(">HHQI", await r.readexactly(16))
        payload = await r.readexactly(length)
        if typ & 0x8000:
            chunks.append(("error", struct.unpack_from(">I", payload)[0],
                           payload[6:].decode(errors="replace")))
        elif typ == 5:
            chunks.append(("status", [struct.unpack_from(">II", payload, k)
                                      for k in range(4, len(payload), 8)]))
        elif typ == 2:
            chunks.append(("hole", *struct.unpack(">QI", payload)))
        elif typ == 1:
            chunks.append(("data", struct.unpack_from(">Q", payload)[0], len(payload) - 8))
        else:
            chunks.append(("type", typ))
        if flags & 1:
            return chunks
        (magic,) = struct.unpack(">I", await r.readexactly(4))


def make_image(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(SIZE)
        f.write(b"D" * 65536)


def test_transmission_replies_match_qemu_storage_daemon(tmp_path: Path) -> None:
    require_tool("qemu-storage-daemon")

    async def main() -> None:
        theirs, ours = tmp_path / "theirs.raw", tmp_path / "ours.raw"
        make_image(theirs)
        make_image(ours)
        qsock = str(tmp_path / "qsd.sock")
        async with peer("qemu-storage-daemon", "--blockdev",
                        f"driver=file,node-name=f0,filename={theirs}",
                        "--nbd-server", f"addr.type=unix,addr.path={qsock}",
                        "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on",
                        "--export", "type=nbd,id=e1,node-name=f0,name=ro", ready=qsock):
            d = Daemon()
            await open_blockdev(d.graph, {"driver": "file", "node-name": "f0",
                                          "filename": str(ours)})
            sock = str(tmp_path / "ours.sock")
            await nq.nbd_server_start(d, {"addr": {"type": "unix", "data": {"path": sock}}})
            await nq.block_export_add(d, {"type": "nbd", "id": "e0", "node-name": "f0",
                                          "name": "disk", "writable": True})
            await nq.block_export_add(d, {"type": "nbd", "id": "e1", "node-name": "f0",
                                          "name": "ro"})
            try:
                for export in ("ro", "disk"):
                    for structured in (False, True):
                        a = await probe(qsock, export, structured)
                        b = await probe(sock, export, structured)
                        diff = [f"{export} structured={structured}: qsd {x} != ours {y}"
                                for x, y in zip(a, b, strict=True) if x != y]
                        assert not diff, "\n".join(diff)
            finally:
                await nq.nbd_server_stop(d)
                await d.shutdown()
        assert theirs.read_bytes() == ours.read_bytes()

    asyncio.run(main())
