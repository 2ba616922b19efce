"""Helpers shared by the NBD tests: an in-memory block driver and an export fixture.

``RamDriver`` is a sparse in-memory protocol driver (64 KiB allocation granules), so the NBD
tests do not depend on the file/qcow2 drivers; ``ram_node`` builds a node of it in a graph, and
``serve`` starts a daemon's NBD server with one export on a unix socket; ``run`` and ``peer``
run peer tools (a peer server is always killed when its block ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from blockmirror.block.driver import BlockDriver, BlockStatus, Extent, WriteFlags
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.daemon import Daemon
from blockmirror.errors import BlockIOError
from blockmirror.qmp.commands.nbd import block_export_add, nbd_server_start, nbd_server_stop

GRANULE = 65536


class RamDriver(BlockDriver):
    format_name = "x-ram"
    can_write_zeroes_with_unmap = True

    def __init__(self, node: BlockNode, size: int = 0) -> None:
        super().__init__(node)
        self.data = bytearray(size)
        self.allocated: set[int] = set()
        self.flushes = 0
        self.fail_reads_at: int | None = None

    def length(self) -> int:
        return len(self.data)

    async def preadv(self, offset: int, length: int) -> bytes:
        if self.fail_reads_at is not None and offset <= self.fail_reads_at < offset + length:
            raise BlockIOError(errno.EIO)
        return bytes(self.data[offset : offset + length])

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        self.data[offset : offset + len(data)] = data
        for g in range(offset // GRANULE, (offset + len(data) - 1) // GRANULE + 1):
            self.allocated.add(g)

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        self.data[offset : offset + length] = bytes(length)
        for g in range(offset // GRANULE, (offset + length - 1) // GRANULE + 1):
            whole = g * GRANULE >= offset and (g + 1) * GRANULE <= offset + length
            if whole and flags & WriteFlags.MAY_UNMAP:
                self.allocated.discard(g)
            else:
                self.allocated.add(g)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self.pwrite_zeroes(offset, length, WriteFlags.MAY_UNMAP)

    async def flush(self) -> None:
        self.flushes += 1

    async def block_status(self, offset: int, length: int) -> Extent:
        g = offset // GRANULE
        alloc = g in self.allocated
        end = (g + 1) * GRANULE
        while end < offset + length and ((end // GRANULE) in self.allocated) == alloc:
            end += GRANULE
        n = min(end, offset + length) - offset
        if alloc:
            return Extent(n, BlockStatus.DATA | BlockStatus.ALLOCATED)
        return Extent(n, BlockStatus.ZERO)


def ram_node(graph: BlockGraph, name: str, size: int, *, read_only: bool = False,
             discard_unmap: bool = True) -> BlockNode:
    node = BlockNode(name=name, read_only=read_only, discard_unmap=discard_unmap)
    node.driver = RamDriver(node, size)
    graph.add_node(node)
    return node


@contextlib.asynccontextmanager
async def serve(tmp: Path, daemon: Daemon | None = None, *, node_name: str = "n0",
                size: int = 4 << 20, name: str = "disk", writable: bool = True,
                extra: dict[str, Any] | None = None) -> AsyncIterator[tuple[Daemon, str]]:
    """A daemon whose NBD server exports a RAM node; yields (daemon, socket path)."""
    d = daemon or Daemon()
    if d.graph.find_node(node_name) is None:
        ram_node(d.graph, node_name, size)
    sock = str(tmp / "nbd.sock")
    await nbd_server_start(d, {"addr": {"type": "unix", "data": {"path": sock}}})
    await block_export_add(d, {"type": "nbd", "id": "e0", "node-name": node_name,
                               "name": name, "writable": writable, **(extra or {})})
    try:
        yield d, sock
    finally:
        if d.nbd is not None:
            await nbd_server_stop(d)


class SocketClient:
    """Drives the NBD server's client handler over a real socket pair, as a connection from
    ``accept()`` would be: ``send`` what a client sends, ``out`` collects what the server
    answered until it closed the connection."""

    def __init__(self, server: Any) -> None:
        from blockmirror.export import nbd_server as ns

        self._server = server
        self._ns = ns
        self.out = bytearray()
        self.client: Any = None
        self.task: asyncio.Task[None] | None = None
        self._peer_w: asyncio.StreamWriter | None = None
        self._collector: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        self.client = self._ns._Client(self._server, reader, writer)
        self.task = asyncio.ensure_future(self.client.run())
        peer_r, self._peer_w = await asyncio.open_connection(sock=theirs)
        self._collector = asyncio.ensure_future(self._collect(peer_r))

    async def _collect(self, peer_r: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await peer_r.read(1 << 20):
                self.out += chunk

    async def send(self, data: bytes, *, eof: bool = True) -> None:
        """Send ``data`` (then end the stream); a server that hangs up early ends it too."""
        w = self._peer_w
        assert w is not None
        with contextlib.suppress(ConnectionError):
            w.write(data)
            await w.drain()
            if eof:
                w.write_eof()

    async def finish(self, limit_s: float) -> bytes:
        """Wait for the handler to end and for the server's side of the socket to close."""
        assert self.task is not None and self._collector is not None
        await asyncio.wait_for(self.task, limit_s)
        await asyncio.wait_for(self._collector, limit_s)
        if self._peer_w is not None:
            self._peer_w.close()
        return bytes(self.out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(*args: str, check: bool = True, limit_s: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode()
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}): {text}")
    return text


@contextlib.asynccontextmanager
async def peer(*args: str, ready: str | int | None) -> AsyncIterator[asyncio.subprocess.Process]:
    """A server process, ready once the socket path exists / the port accepts (None: at once);
    always killed on exit."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        # poll for readiness with a generous deadline (a loaded machine can take seconds)
        deadline = time.monotonic() + 30
        while ready is not None:
            if isinstance(ready, str) and await asyncio.to_thread(os.path.exists, ready):
                break
            if isinstance(ready, int):
                with contextlib.suppress(OSError):
                    _, w = await asyncio.open_connection("127.0.0.1", ready)
                    w.close()
                    break
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"{args[0]} exited: {err.decode()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{args[0]} was not ready within 30 s")
            await asyncio.sleep(0.05)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
