"""The generic request path: everything done once for every driver (cf. QEMU's block/io.c).

Bounds and permission checks, splitting to ``max_transfer``, zero detection, the zero-write
fallback, FUA emulation, in-flight accounting for drains, write interceptors (active mirroring)
and dirty tracking (every successful write, zero-write or discard marks each tracker of the node).
Drivers below this line see only requests they can take as they are.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from blockmirror.block.driver import Extent, WriteFlags
from blockmirror.errors import BlockIOError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from blockmirror.block.node import BlockNode

#: the largest zero buffer we allocate when a driver cannot write zeroes natively
_ZERO_CHUNK = 1024 * 1024
_drain_events: dict[int, asyncio.Event] = {}


def check_request(node: BlockNode, offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise BlockIOError(errno.EIO, "Invalid request")
    if offset + length > node.length():
        raise BlockIOError(errno.EIO, "Request beyond end of device")


def check_writable(node: BlockNode) -> None:
    if node.read_only:
        raise BlockIOError(errno.EPERM, "Block node is read-only")
    if node.corrupt:
        raise BlockIOError(errno.EIO, "Image is corrupt; cannot be opened read/write")


@asynccontextmanager
async def _tracked(node: BlockNode) -> AsyncIterator[None]:
    node.in_flight += 1
    try:
        yield
    finally:
        node.in_flight -= 1
        if node.in_flight == 0:
            ev = _drain_events.pop(id(node), None)
            if ev is not None:
                ev.set()


async def drain(node: BlockNode) -> None:
    while node.in_flight:
        ev = _drain_events.setdefault(id(node), asyncio.Event())
        await ev.wait()


def _chunks(offset: int, length: int, limit: int) -> list[tuple[int, int]]:
    out = []
    end = offset + length
    while offset < end:
        n = min(limit, end - offset)
        out.append((offset, n))
        offset += n
    return out


async def read(node: BlockNode, offset: int, length: int) -> bytes:
    check_request(node, offset, length)
    if length == 0:
        return b""
    async with _tracked(node):
        drv = node.driver
        parts = [await drv.preadv(o, n) for o, n in _chunks(offset, length, drv.max_transfer)]
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _intercepted(
    node: BlockNode, kind: str, offset: int, length: int, op: Callable[[], Awaitable[None]]
) -> None:
    """Run ``op`` through the node's interceptors (outermost first), then mark trackers."""

    async def run(i: int) -> None:
        if i == len(node.interceptors):
            await op()
            return
        await node.interceptors[i].around_write(node, kind, offset, length, lambda: run(i + 1))

    async with _tracked(node):
        await run(0)
    for tracker in list(node.dirty_trackers):
        tracker.mark(offset, length)


async def write(node: BlockNode, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
    length = len(data)
    check_request(node, offset, length)
    check_writable(node)
    if length == 0:
        return
    if node.detect_zeroes != "off" and not any(data):
        await write_zeroes(node, offset, length, may_unmap=node.detect_zeroes == "unmap", fua=fua)
        return

    async def op() -> None:
        drv = node.driver
        flags = WriteFlags.FUA if fua and drv.supports_fua else WriteFlags.NONE
        view = memoryview(data)
        for o, n in _chunks(offset, length, drv.max_transfer):
            await drv.pwritev(o, view[o - offset : o - offset + n], flags)
        if fua and not drv.supports_fua:
            await drv.flush()

    await _intercepted(node, "write", offset, length, op)


async def write_zeroes(
    node: BlockNode,
    offset: int,
    length: int,
    *,
    may_unmap: bool = False,
    fua: bool = False,
    no_fallback: bool = False,
) -> None:
    check_request(node, offset, length)
    check_writable(node)
    if length == 0:
        return
    unmap = may_unmap and node.discard_unmap

    async def op() -> None:
        drv = node.driver
        flags = WriteFlags.NONE
        if unmap:
            flags |= WriteFlags.MAY_UNMAP
        if no_fallback:
            flags |= WriteFlags.NO_FALLBACK
        if fua and drv.supports_fua:
            flags |= WriteFlags.FUA
        try:
            for o, n in _chunks(offset, length, max(drv.max_transfer, _ZERO_CHUNK)):
                await drv.pwrite_zeroes(o, n, flags)
        except BlockIOError as e:
            if e.errno != errno.ENOTSUP or no_fallback:
                raise
            zeroes = bytes(min(length, _ZERO_CHUNK, drv.max_transfer))
            for o, n in _chunks(offset, length, len(zeroes)):
                await drv.pwritev(o, memoryview(zeroes)[:n], WriteFlags.NONE)
        if fua and not drv.supports_fua:
            await drv.flush()

    await _intercepted(node, "zero", offset, length, op)


async def discard(node: BlockNode, offset: int, length: int) -> None:
    """Discard is advisory: ignored unless the node was opened with discard=unmap."""
    check_request(node, offset, length)
    check_writable(node)
    if length == 0:
        return

    async def op() -> None:
        if not node.discard_unmap:
            return
        drv = node.driver
        try:
            for o, n in _chunks(offset, length, max(drv.max_transfer, _ZERO_CHUNK)):
                await drv.pdiscard(o, n)
        except BlockIOError as e:
            if e.errno != errno.ENOTSUP:
                raise

    await _intercepted(node, "discard", offset, length, op)


async def flush(node: BlockNode) -> None:
    if node.cache_no_flush:
        return
    async with _tracked(node):
        await node.driver.flush()


async def block_status(node: BlockNode, offset: int, length: int) -> Extent:
    check_request(node, offset, length)
    size = node.length()
    length = min(length, size - offset)
    if length <= 0:
        raise BlockIOError(errno.EIO, "block_status past the end of the node")
    ext = await node.driver.block_status(offset, length)
    if ext.length <= 0:
        raise BlockIOError(errno.EIO, f"driver {node.format_name} returned an empty extent")
    if ext.length > length:
        ext = Extent(length, ext.status, ext.depth, ext.map_offset, ext.map_node)
    return ext
