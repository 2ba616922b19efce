"""The generic request path: everything done once for every driver (cf. QEMU's block/io.c).

Bounds and permission checks, splitting to ``max_transfer``, request alignment (unaligned reads
are widened, unaligned writes become serialised read-modify-write cycles), zero detection, the
zero-write fallback, FUA emulation, in-flight accounting for drains, write interceptors (active
mirroring) and dirty tracking (every successful write, zero-write or discard marks each tracker
of the node). Drivers below this line see only requests they can take as they are.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from blockmirror.block import faults
from blockmirror.block.driver import BlockStatus, Extent, WriteFlags
from blockmirror.errors import BlockIOError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from blockmirror.block.node import BlockNode, WriteInterceptor

_FUA = WriteFlags.FUA
_NO_FLAGS = WriteFlags.NONE

#: the largest zero buffer we allocate when a driver cannot write zeroes natively
_ZERO_CHUNK = 1024 * 1024


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
        _untrack(node)


def _untrack(node: BlockNode) -> None:
    """The end of ``_tracked`` (the request path inlines its start: one ``+= 1``)."""
    node.in_flight -= 1
    if node.in_flight == 0 and node.drain_event is not None:
        ev, node.drain_event = node.drain_event, None
        ev.set()


async def drain(node: BlockNode) -> None:
    while node.in_flight:
        if node.drain_event is None:
            node.drain_event = asyncio.Event()
        await node.drain_event.wait()


def _align_out(offset: int, length: int, align: int) -> tuple[int, int]:
    start = offset - offset % align
    end = -(-(offset + length) // align) * align
    return start, end - start


async def _driver_read(node: BlockNode, offset: int, length: int) -> bytes:
    """Read through the driver in max_transfer pieces; widened to the driver's alignment."""
    drv = node.driver
    align = drv.request_alignment
    if align > 1 and (offset % align or length % align):
        start, alen = _align_out(offset, length, align)
        # the last block of a node whose size is not a multiple of the alignment is read
        # only up to the end, and padded (cf. bdrv_aligned_preadv's max_bytes)
        avail = min(alen, node.length() - start)
        data = await _driver_read_aligned(node, start, avail)
        if avail < alen:
            data += bytes(alen - avail)
        return data[offset - start : offset - start + length]
    return await _driver_read_aligned(node, offset, length)


async def _driver_read_aligned(node: BlockNode, offset: int, length: int) -> bytes:
    drv = node.driver
    align = drv.request_alignment
    limit = max(align, drv.max_transfer - drv.max_transfer % align) if align > 1 else (
        drv.max_transfer
    )
    parts = [await drv.preadv(o, n) for o, n in _chunks(offset, length, limit)]
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _WriteRange:
    """A write in flight on a node with request_alignment > 1 (aligned-out bounds)."""

    __slots__ = ("done", "end", "rmw", "start")

    def __init__(self, start: int, end: int, rmw: bool) -> None:
        self.start, self.end, self.rmw = start, end, rmw
        self.done = asyncio.Event()


async def _enter_range(node: BlockNode, start: int, end: int, rmw: bool) -> _WriteRange:
    """Wait out the in-flight writes this one must not overlap, then register it.

    A read-modify-write cycle must not overlap any other write (it would write back stale
    bytes); an aligned write only has to wait for overlapping RMW cycles. Aligned writes to
    different places therefore run concurrently (one lock per node serialised them all).
    """
    while True:
        blocking = [
            w for w in node.write_ranges
            if w.start < end and start < w.end and (rmw or w.rmw)
        ]
        if not blocking:
            break
        await blocking[0].done.wait()
    entry = _WriteRange(start, end, rmw)
    node.write_ranges.append(entry)
    return entry


def _leave_range(node: BlockNode, entry: _WriteRange) -> None:
    node.write_ranges.remove(entry)
    entry.done.set()


async def _driver_write(
    node: BlockNode, offset: int, data: bytes | memoryview, flags: WriteFlags
) -> None:
    """Write through the driver; unaligned edges become read-modify-write.

    cf. bdrv_co_pwritev_part and its padding helpers, and QEMU's serialising requests.
    """
    drv = node.driver
    align = drv.request_alignment
    if align <= 1:
        view = memoryview(data)
        for o, n in _chunks(offset, len(view), drv.max_transfer):
            await drv.pwritev(o, view[o - offset : o - offset + n], flags)
        return
    length = len(data)
    rmw = bool(offset % align or length % align)
    start, alen = _align_out(offset, length, align)
    entry = await _enter_range(node, start, start + alen, rmw)
    try:
        if rmw:
            buf = bytearray(await _driver_read(node, start, alen))
            buf[offset - start : offset - start + length] = data
            # never write past the end of the node (its last block may be partial)
            del buf[node.length() - start :]
            offset, view = start, memoryview(buf)
        else:
            view = memoryview(data)
        limit = max(align, drv.max_transfer - drv.max_transfer % align)
        for o, n in _chunks(offset, len(view), limit):
            await drv.pwritev(o, view[o - offset : o - offset + n], flags)
    finally:
        _leave_range(node, entry)


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
    node.in_flight += 1
    start, ok = time.monotonic_ns(), False
    try:
        if node.fault_rules:
            await faults.check(node, "read", offset, length)
        data = await _driver_read(node, offset, length)
        ok = True
        return data
    finally:
        node.stats.done("read", offset, length, start, ok)
        _untrack(node)


def _aligned_all(node: BlockNode, ranges: list[tuple[int, int]]) -> bool:
    align = node.driver.request_alignment
    return align <= 1 or all(o % align == 0 and n % align == 0 for o, n in ranges)


async def read_many(node: BlockNode, extents: list[tuple[int, int]]) -> list[bytes]:
    """``read`` of every extent; one driver call for all of them where the driver can."""
    for offset, length in extents:
        check_request(node, offset, length)
    if len(extents) > 1 and not node.fault_rules and _aligned_all(node, extents):
        async with _tracked(node):
            parts = await node.driver.read_extents(extents)
        if parts is not None:
            node.stats.record_batch("read", extents)
            return parts
    return list(await asyncio.gather(*(read(node, o, n) for o, n in extents)))


async def write_many(node: BlockNode, pieces: list[tuple[int, bytes | memoryview]]) -> None:
    """``write`` of every piece; one driver call for all of them where nothing else on the
    node needs to see each write (interceptors, trackers, zero detection) and the driver can.
    On failure some pieces may have been written."""
    views = [(o, memoryview(d)) for o, d in pieces]
    for offset, view in views:
        check_request(node, offset, len(view))
    check_writable(node)
    if (len(views) > 1 and not node.interceptors and not node.dirty_trackers
            and node.detect_zeroes == "off"
            and _aligned_all(node, [(o, len(v)) for o, v in views])):
        try:
            async with _tracked(node):
                done = await node.driver.write_extents(views)
        finally:
            node.write_gen += 1
        if done:
            node.stats.record_batch("write", [(o, len(v)) for o, v in views])
            return
    results = await asyncio.gather(*(write(node, o, v) for o, v in views),
                                   return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def write_zeroes_many(
    node: BlockNode, extents: list[tuple[int, int]], *, may_unmap: bool = False
) -> None:
    """``write_zeroes`` of every extent; one driver call for all of them where nothing else
    on the node needs to see each request and the driver can (a mirror's zero ops on a
    fragmented disk). On failure some extents may have been zeroed."""
    for offset, length in extents:
        check_request(node, offset, length)
    check_writable(node)
    if (len(extents) > 1 and not node.interceptors and not node.dirty_trackers
            and not node.fault_rules and _aligned_all(node, extents)):
        flags = WriteFlags.MAY_UNMAP if may_unmap and node.discard_unmap else WriteFlags.NONE
        try:
            async with _tracked(node):
                done = await node.driver.zero_extents(extents, flags)
        finally:
            node.write_gen += 1
        if done:
            node.stats.record_batch("zero", extents)
            return
    results = await asyncio.gather(*(write_zeroes(node, o, n, may_unmap=may_unmap)
                                     for o, n in extents), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


class Proceed:
    """What an interceptor awaits (exactly once) to let a write go on down the chain.

    ``data`` is the write's payload (None for zeroes and discards): an active mirror copies
    it to its target without reading the source back. A plain object, not a closure that
    calls itself: a self-referencing closure is a reference cycle that would keep the
    request's data buffer alive until the cyclic GC runs.
    """

    __slots__ = ("_chain", "_i", "_kind", "_length", "_node", "_offset", "_op", "data")

    def __init__(self, chain: list[WriteInterceptor], i: int, node: BlockNode, kind: str,
                 offset: int, length: int, op: Callable[[], Awaitable[None]],
                 data: bytes | memoryview | None) -> None:
        self._chain, self._i, self._node, self._kind = chain, i, node, kind
        self._offset, self._length, self._op, self.data = offset, length, op, data

    async def __call__(self) -> None:
        chain, i = self._chain, self._i
        if i == len(chain):
            await self._op()
            return
        await chain[i].around_write(self._node, self._kind, self._offset, self._length, Proceed(
            chain, i + 1, self._node, self._kind, self._offset, self._length, self._op,
            self.data))


async def _intercepted(
    node: BlockNode, kind: str, offset: int, length: int, op: Callable[[], Awaitable[None]],
    data: bytes | memoryview | None = None,
) -> None:
    """Run ``op`` through the node's interceptors (outermost first), then mark trackers."""

    # the chain this request sees: an interceptor removed meanwhile (a job ending) must still
    # be able to proceed into the rest of it
    chain = list(node.interceptors)
    node.in_flight += 1
    start, ok = time.monotonic_ns(), False
    try:
        if chain:
            await Proceed(chain, 0, node, kind, offset, length, op, data)()
        else:
            await op()
        ok = True
    finally:
        _change_ended(node, kind, offset, length, start, ok)


def _change_ended(node: BlockNode, kind: str, offset: int, length: int, start: int,
                  ok: bool) -> None:
    """A write, zero or discard request ended (failed or not): statistics, write
    generation, dirty trackers, in-flight count.

    Failed requests count too, as in QEMU's bdrv_co_write_req_finish: the range may be
    half-written (a request in several pieces, data written and metadata not), and a
    mirror that did not copy it again would leave its target behind the source."""
    node.stats.done(kind, offset, length, start, ok)
    node.write_gen += 1
    for tracker in list(node.dirty_trackers):
        tracker.mark(offset, length)
    _untrack(node)


async def _write_handled_early(node: BlockNode, offset: int, data: bytes | memoryview,
                               fua: bool) -> bool:
    """The head every data write shares: the checks, then an empty write (nothing to do) or
    an all-zero one under detect-zeroes (a zero write instead). True: nothing left to do."""
    length = len(data)
    check_request(node, offset, length)
    check_writable(node)
    if length == 0:
        return True
    if node.detect_zeroes != "off" and not any(data):
        await write_zeroes(node, offset, length, may_unmap=node.detect_zeroes == "unmap", fua=fua)
        return True
    return False


async def write(node: BlockNode, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
    if await _write_handled_early(node, offset, data, fua):
        return
    length = len(data)
    drv = node.driver
    if (not node.interceptors and not node.fault_rules and drv.request_alignment <= 1
            and length <= drv.max_transfer):
        # the common case, with nothing hooked in and one driver request (a qcow2 image's
        # own metadata and data writes to its file, two or three per guest write): the
        # steps of _intercepted + op below, without the closure, chunk list and frames
        # (keep the two in step)
        flags = _FUA if fua and drv.supports_fua else _NO_FLAGS
        node.in_flight += 1
        start, ok = time.monotonic_ns(), False
        try:
            await drv.pwritev(offset, data, flags)
            if fua and not drv.supports_fua:
                await drv.flush()
            ok = True
        finally:
            _change_ended(node, "write", offset, length, start, ok)
        return

    async def op() -> None:
        if node.fault_rules:
            await faults.check(node, "write", offset, length)
        drv = node.driver
        flags = WriteFlags.FUA if fua and drv.supports_fua else WriteFlags.NONE
        await _driver_write(node, offset, data, flags)
        if fua and not drv.supports_fua:
            await drv.flush()

    await _intercepted(node, "write", offset, length, op, data)


def supports_compressed_writes(node: BlockNode) -> bool:
    """cf. bdrv_supports_compressed_writes: the driver takes compressed writes and, for a
    filter, so does the node below it."""
    if not node.driver.supports_compressed_writes:
        return False
    child = node.filtered_child()
    return child is None or supports_compressed_writes(child)


async def write_compressed(node: BlockNode, offset: int, data: bytes | memoryview) -> None:
    """A write of whole clusters that the driver stores compressed (cf. a write with
    BDRV_REQ_WRITE_COMPRESSED): the same checks, interceptors and dirty tracking as ``write``;
    zero detection still turns an all-zero request into a zero write, as in QEMU."""
    if await _write_handled_early(node, offset, data, False):
        return
    length = len(data)

    async def op() -> None:
        if node.fault_rules:
            await faults.check(node, "write", offset, length)
        await node.driver.pwritev_compressed(offset, data)

    await _intercepted(node, "write", offset, length, op, data)


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
        if node.fault_rules:
            await faults.check(node, "zero", offset, length)
        drv = node.driver
        flags = WriteFlags.NONE
        if unmap:
            flags |= WriteFlags.MAY_UNMAP
        if no_fallback:
            flags |= WriteFlags.NO_FALLBACK
        if fua and drv.supports_fua:
            flags |= WriteFlags.FUA
        start, end = offset, offset + length
        align = drv.request_alignment
        if align > 1:
            # unaligned edges are written as data (RMW); the driver sees only aligned zeroing
            head_end = min(end, -(-start // align) * align)
            tail_start = max(head_end, end - end % align)
            edge = flags & WriteFlags.FUA  # a native FUA covers the edges too
            if head_end > start:
                await _driver_write(node, start, bytes(head_end - start), edge)
            if end > tail_start:
                await _driver_write(node, tail_start, bytes(end - tail_start), edge)
            start, end = head_end, tail_start
        if end > start:
            await _zero_aligned(node, start, end - start, flags, no_fallback)
        if fua and not drv.supports_fua:
            await drv.flush()

    await _intercepted(node, "zero", offset, length, op)


async def _zero_aligned(
    node: BlockNode, offset: int, length: int, flags: WriteFlags, no_fallback: bool
) -> None:
    drv = node.driver
    try:
        for o, n in _chunks(offset, length, max(drv.max_transfer, _ZERO_CHUNK)):
            await drv.pwrite_zeroes(o, n, flags)
    except BlockIOError as e:
        if e.errno != errno.ENOTSUP or no_fallback:
            raise
        zeroes = bytes(min(length, _ZERO_CHUNK, drv.max_transfer))
        await _fallback_zero_writes(node, offset, length, zeroes, flags & WriteFlags.FUA)


async def _fallback_zero_writes(node: BlockNode, offset: int, length: int, zeroes: bytes,
                                flags: WriteFlags = WriteFlags.NONE) -> None:
    for o, n in _chunks(offset, length, len(zeroes)):
        await _driver_write(node, o, memoryview(zeroes)[:n], flags)


async def discard(node: BlockNode, offset: int, length: int) -> None:
    """Discard is advisory: ignored unless the node was opened with discard=unmap."""
    check_request(node, offset, length)
    check_writable(node)
    if length == 0 or not node.discard_unmap:
        # cf. bdrv_co_pdiscard: without discard=unmap nothing happens, and nothing (dirty
        # bitmaps, a mirror) hears of it
        return

    async def op() -> None:
        if node.fault_rules:
            await faults.check(node, "discard", offset, length)
        drv = node.driver
        # discard is advisory: only whole aligned blocks reach the driver
        align = drv.request_alignment
        start = -(-offset // align) * align
        end = (offset + length) - (offset + length) % align
        if end <= start:
            return
        try:
            for o, n in _chunks(start, end - start, max(drv.max_transfer, _ZERO_CHUNK)):
                await drv.pdiscard(o, n)
        except BlockIOError as e:
            if e.errno != errno.ENOTSUP:
                raise

    await _intercepted(node, "discard", offset, length, op)


async def _refine_from_file(
    file: BlockNode, map_offset: int, n: int, status: BlockStatus
) -> tuple[int, BlockStatus]:
    """cf. the BDRV_BLOCK_RECURSE step of bdrv_co_block_status: extra information only."""
    flen = file.length()
    if map_offset >= flen:
        # the image is zero-padded after the end of its file
        return n, status | BlockStatus.ZERO
    try:
        fext = await block_status(file, map_offset, min(n, flen - map_offset))
    except BlockIOError:
        return n, status
    if fext.status & BlockStatus.EOF and fext.status & BlockStatus.ZERO:
        return n, status | BlockStatus.ZERO
    return min(n, fext.length), status | (fext.status & BlockStatus.ZERO)


def _primary_child(node: BlockNode) -> BlockNode | None:
    return node.file or node.child("image") or node.filtered_child()


async def flush(node: BlockNode) -> None:
    """cf. bdrv_co_flush: nothing to do when nothing was written since the last flush;
    blkdebug sees flush_to_os/flush_to_disk on the primary child."""
    primary = _primary_child(node)
    if primary is not None:
        primary.debug_event("flush_to_os")
    if node.fault_rules:
        await faults.check(node, "flush", 0, 0)
    if node.cache_no_flush:
        return
    current = node.write_gen
    if node.flushed_gen == current:
        return
    if primary is not None:
        primary.debug_event("flush_to_disk")
    node.in_flight += 1
    start, ok = time.monotonic_ns(), False
    try:
        await node.driver.flush()
        ok = True
    finally:
        node.stats.done("flush", 0, 0, start, ok)
        _untrack(node)
    node.flushed_gen = max(node.flushed_gen, current)


async def block_status(
    node: BlockNode, offset: int, length: int, want_zero: bool = True
) -> Extent:
    """cf. bdrv_co_block_status; ``want_zero=False`` skips asking the file layer below a
    format whether data clusters read as zeroes (as ``bdrv_is_allocated`` does)."""
    check_request(node, offset, length)
    size = node.length()
    length = min(length, size - offset)
    if length <= 0:
        raise BlockIOError(errno.EIO, "block_status past the end of the node")
    if node.fault_rules:
        await faults.check(node, "block-status", offset, length)
    drv = node.driver
    ext = await drv.block_status(offset, length)
    if ext.length <= 0:
        raise BlockIOError(errno.EIO, f"driver {node.format_name} returned an empty extent")
    n = min(ext.length, length)
    status = ext.status
    # cf. bdrv_co_block_status: what the generic layer adds to every driver's answer
    if status & (BlockStatus.DATA | BlockStatus.ZERO):
        status |= BlockStatus.ALLOCATED
    elif drv.supports_backing or drv.format_name == "qcow2":
        cow = node.backing
        if cow is None:
            status |= BlockStatus.ZERO
        else:
            # unallocated past the end of a shorter backing file reads as zeroes
            cow_len = cow.length()
            if offset >= cow_len:
                status |= BlockStatus.ZERO
            elif offset + n > cow_len:
                n = cow_len - offset
    if (
        want_zero
        and drv.recurse_block_status
        and status & BlockStatus.DATA
        and not status & BlockStatus.ZERO
        and status & BlockStatus.OFFSET_VALID
        and ext.map_node is not None
        and ext.map_node is not node
        and ext.map_offset is not None
    ):
        n, status = await _refine_from_file(ext.map_node, ext.map_offset, n, status)
    if offset + n == size:
        status |= BlockStatus.EOF
    else:
        status &= ~BlockStatus.EOF
    if n != ext.length or status != ext.status:
        ext = Extent(n, status, ext.depth, ext.map_offset, ext.map_node)
    return ext
