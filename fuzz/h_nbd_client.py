"""Harness: our NBD client (the nbd block driver) against a hostile server.

Once per process, a real exchange is recorded: the driver opens an export of our own server
(structured replies, base:allocation) and reads, walks block status, writes, zeroes,
discards and flushes; the server-to-client bytes are kept. Each input then replays that
recording with fuzzer-chosen damage (bytes overwritten in the greeting, option replies,
reply headers, chunk lengths, payloads; truncation; junk appended) from a unix socket
server that hangs up after sending it, while a fresh driver repeats the same operations.

Invariants: opening fails with a BlockMirrorError or succeeds; every operation ends with a
result or a BlockMirrorError (never another exception), and none hangs once the server has
hung up; closing works and hangs up every connection the driver made (reconnects included).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from blockmirror.block.graph import BlockGraph
from blockmirror.block.options import close_all, open_blockdev
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockMirrorError
from blockmirror.export import nbd_server as ns
from fuzz.common import Finding, run, scratch
from fuzz.provider import Input
from nbd_helpers import ram_node

SIZE = 1 << 20
DICT = [b"\x67\x44\x66\x98", b"\x66\x8e\x33\xef", b"\x00\x03\xe8\x89\x04\x55\x65\xa9",
        b"\xff\xff\xff\xff", b"\0\0\0\0"]
_RECORDING: list[bytes] = []
#: how long after close_all the client's connections may take to reach the server as hang-ups
CLOSE_LIMIT_S = 5.0


async def _ops(path: str) -> None:
    graph = BlockGraph()
    try:
        try:
            node = await open_blockdev(graph, {
                "driver": "nbd", "node-name": "c", "export": "disk",
                "server": {"type": "unix", "path": path}})
        except BlockMirrorError:
            return
        ops: list[Any] = [
            lambda: node.read(0, 4096), lambda: node.block_status(0, SIZE),
            lambda: node.write(65536, b"\x5a" * 4096), lambda: node.write_zeroes(131072, 8192),
            lambda: node.discard(196608, 65536), lambda: node.flush(),
            lambda: node.read(SIZE - 512, 512)]
        for op in ops:
            try:
                await asyncio.wait_for(op(), 10)
            except BlockMirrorError:
                pass
            except TimeoutError as e:
                raise Finding("an NBD request hung after the server hung up") from e
    finally:
        with contextlib.suppress(BlockMirrorError):
            await asyncio.wait_for(close_all(graph), 10)


async def _record() -> bytes:
    d = Daemon()
    node = ram_node(d.graph, "n0", SIZE)
    server = ns.NbdServer(d.graph, d.events)
    real = os.path.join(scratch(), "real.sock")
    proxy = os.path.join(scratch(), "proxy.sock")
    await server.listen({"type": "unix", "path": real})
    server.add_export("e0", node, name="disk", description="", writable=True)
    got = bytearray()

    async def relay(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_unix_connection(real)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, keep: bool) -> None:
            while data := await r.read(65536):
                if keep:
                    got.extend(data)
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pump(cr, sw, False), pump(sr, cw, True),
                             return_exceptions=True)

    srv = await asyncio.start_unix_server(relay, proxy)
    try:
        await _ops(proxy)
    finally:
        srv.close()
        await server.stop()
    return bytes(got)


def _damage(inp: Input, rec: bytes) -> bytes:
    out = bytearray(rec)
    mode = inp.below(8)
    if mode == 0:
        return inp.rest()
    for _ in range(1 + inp.below(4)):
        if not out:
            break
        pos = inp.below(len(out))
        width = inp.pick([1, 1, 2, 4, 8])
        value = inp.bytes(width).ljust(width, b"\0")
        if inp.below(4) == 0:
            value = inp.pick([b"\xff" * width, b"\0" * width, b"\x80" + b"\0" * (width - 1)])
        out[pos:pos + width] = value
    if mode == 1:
        del out[inp.below(len(out) + 1):]
    if mode == 2:
        out += inp.rest()
    return bytes(out)


async def _hostile(stream: bytes) -> None:
    path = os.path.join(scratch(), "hostile.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    handlers: list[asyncio.Task[None]] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        try:
            w.write(stream)
            await w.drain()
            # hang up at once: the client reads the stream, then end-of-file (a half-close,
            # so its requests can still be written and the connection ends cleanly when it
            # closes its side)
            w.write_eof()
            await r.read()
        except ConnectionError:
            pass
        finally:
            w.close()

    srv = await asyncio.start_unix_server(serve, path)
    try:
        await _ops(path)
        # the node is closed: every connection it made must be hung up by now (a socket left
        # open is a leak; the server side sees it as a read that never ends)
        if handlers:
            _, still_open = await asyncio.wait(list(handlers), timeout=CLOSE_LIMIT_S)
            if still_open:
                raise Finding(f"{len(still_open)} of {len(handlers)} connections still open "
                              f"{CLOSE_LIMIT_S} s after the node was closed")
    finally:
        srv.close()
        for task in handlers:  # a client that never closed its side: the test is over
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def one_input(data: bytes) -> None:
    if not _RECORDING:
        _RECORDING.append(run(_record(), 60))
    stream = _damage(Input(data), _RECORDING[0])
    try:
        run(_hostile(stream), 120)
    except Finding:
        raise
    except BlockMirrorError:
        pass
    except Exception as e:
        raise Finding(f"{type(e).__name__}: {e}") from e
