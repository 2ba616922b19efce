"""The qcow2 image file: byte access to the ``file`` child, its growth, and in-flight host I/O.

The protocol node refuses requests past its length, so the file grows ahead of allocation in
large steps (sequential allocation would otherwise resize it on every request) and ``trim``
cuts it back to what is used on close. Host cluster ranges under data I/O outside the metadata
lock are registered here, so that the refcount allocator does not release a cluster still
being read or written.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from blockmirror.block.copy import read_host, write_host
from blockmirror.block.drivers.qcow2.header import Header, encode_fixed, encode_header_cluster
from blockmirror.block.drivers.qcow2.layout import ceil_div
from blockmirror.errors import BlockIOError, ImageFormatError

if TYPE_CHECKING:
    from blockmirror.block.node import BlockNode


class ImageFile:
    def __init__(self, owner: BlockNode) -> None:
        #: the qcow2 node; its ``file`` child is looked up per call (it is attached after us)
        self._owner = owner
        #: the file length as far as we know it (grown ahead of ``used_end``)
        self.length = 0
        #: how much of the file holds image data (the rest is growth headroom)
        self.used_end = 0
        #: serialises growing the file (truncate calls must not race) and sub-alignment
        #: read-modify-writes (two of them sharing a block would lose one update)
        self._grow_lock = asyncio.Lock()
        self._rmw_lock = asyncio.Lock()
        #: a resize started ahead of the writes that will need it
        self._grow_task: asyncio.Task[None] | None = None
        #: host cluster ranges [lo, hi) under data I/O outside the lock, by request token
        self._in_flight: dict[int, tuple[int, int]] = {}
        self._token = 0

    @property
    def node(self) -> BlockNode:
        node = self._owner.child("file")
        if node is None:
            raise ImageFormatError("qcow2 node has no file child")
        return node

    def open(self) -> None:
        self.length = self.node.length()
        self.used_end = self.length

    async def read(self, offset: int, length: int) -> bytes:
        """Read; bytes past the end of the file read as zeroes (as QEMU's file driver does)."""
        if length <= 0:
            return b""
        node = self.node
        file_length = node.length()
        avail = max(0, min(length, file_length - offset))
        if avail == 0:
            return bytes(length)
        align = max(1, node.driver.request_alignment)
        start = offset - offset % align
        end = min(ceil_div(offset + avail, align) * align, file_length)
        if start == offset and end == offset + avail:
            data = await node.read(offset, avail)
        else:
            buf = await node.read(start, end - start)
            data = buf[offset - start : offset - start + avail]
        if avail < length:
            data = bytes(data) + bytes(length - avail)
        return data

    async def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """``read`` of every range, in one thread-pool hop when the file node allows it."""
        file_length = self.node.length()
        inside = [(o, max(0, min(n, file_length - o))) for o, n in ranges]
        wanted = [(o, a) for o, a in inside if a > 0]
        got = await read_host(self.node, wanted) if len(wanted) > 1 else None
        if got is None:
            return [await self.read(o, n) for o, n in ranges]
        it = iter(got)
        out: list[bytes] = []
        for (_o, n), (_o2, avail) in zip(ranges, inside, strict=True):
            data = next(it) if avail > 0 else b""
            out.append(data if avail == n else bytes(data) + bytes(n - avail))
        return out

    async def write_many(self, pieces: list[tuple[int, bytes | memoryview]]) -> None:
        """``write`` of every piece, in one thread-pool hop when the file node allows it."""
        if not pieces:
            return
        await self.ensure_size(max(o + len(d) for o, d in pieces))
        if len(pieces) > 1 and await write_host(self.node, pieces):
            return
        for offset, data in pieces:
            await self.write(offset, data)

    async def ensure_size(self, end: int, used: bool = True) -> None:
        """Grow the file to hold ``end``, in big steps."""
        if used:
            self.used_end = max(self.used_end, end)
        if end <= self.length:
            return
        async with self._grow_lock:
            if end <= self.length:
                return
            node = self.node
            align = max(1, node.driver.request_alignment)
            # big steps: each resize waits for a slot in the I/O pool behind the data writes
            step = min(max(self.length // 4, 8 << 20), 256 << 20)
            target = ceil_div(max(end, self.length + step), align) * align
            if node.length() < target:
                await node.driver.truncate(target)
            self.length = max(node.length(), end)

    def grow_ahead(self, needed_end: int) -> None:
        """Start growing the file in the background when allocations near its end, so the
        resize overlaps the data writes instead of stalling the first one past the end."""
        margin = min(max(self.length // 4, 32 << 20), 256 << 20)
        if self._grow_task is not None or needed_end + margin <= self.length:
            return
        target = needed_end + 2 * margin

        async def grow() -> None:
            try:
                await self.ensure_size(target, used=False)
            except BlockIOError:
                pass  # the writes themselves grow the file (and report the error)
            finally:
                self._grow_task = None

        self._grow_task = asyncio.get_running_loop().create_task(grow())

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write, growing the file first; unaligned pieces are read-modify-written."""
        end = offset + len(data)
        await self.ensure_size(end)
        node = self.node
        align = max(1, node.driver.request_alignment)
        if offset % align == 0 and len(data) % align == 0:
            await node.write(offset, data)
            return
        start = offset - offset % align
        aligned_end = ceil_div(end, align) * align
        async with self._rmw_lock:
            buf = bytearray(await self.read(start, aligned_end - start))
            buf[offset - start : end - start] = data
            await node.write(start, bytes(buf))

    async def flush(self) -> None:
        await self.node.flush()

    async def write_pieces(self, pieces: list[tuple[int, bytes]], *, durable: bool) -> None:
        """Write metadata ``pieces`` in order; ``durable``: see ``write_durable``."""
        if durable:
            await self.write_durable(pieces)
            return
        for offset, data in pieces:
            await self.write(offset, data)

    async def write_durable(self, pieces: list[tuple[int, bytes]]) -> None:
        """Write ``pieces``, then make them and every earlier write durable (a flush).

        Not one FUA write for the last piece: a file's FUA write is ``RWF_DSYNC``, which
        syncs only its own range, so data written before it could stay in the page cache
        while metadata pointing at it became durable
        (tests/unit/test_qcow2_durable_order.py)."""
        for offset, data in pieces:
            await self.write(offset, data)
        await self.flush()

    async def write_header(self, header: Header) -> None:
        """Rewrite the fixed header fields in place (extensions are left as they are)."""
        await self.write(0, encode_fixed(header))

    async def write_header_cluster(self, header: Header, cluster_size: int) -> None:
        """Rewrite the whole first cluster: fixed fields, extensions, backing file name."""
        await self.write(0, encode_header_cluster(header, cluster_size))

    async def discard_clusters(self, clusters: list[int], cluster_bits: int) -> None:
        """Pass freed clusters down to the file (cf. pass-discard-request), merged in runs.

        Advisory: the file node ignores it unless opened with discard=unmap, and a failure
        only means the space is not returned to the host yet.
        """
        i = 0
        clusters.sort()
        while i < len(clusters):
            j = i + 1
            while j < len(clusters) and clusters[j] == clusters[j - 1] + 1:
                j += 1
            offset = clusters[i] << cluster_bits
            length = min((j - i) << cluster_bits, self.node.length() - offset)
            if length > 0:
                try:
                    await self.node.discard(offset, length)
                except BlockIOError:
                    pass
            i = j

    async def settle(self) -> None:
        """Wait for a background resize (before closing)."""
        if self._grow_task is not None:
            await self._grow_task

    async def trim(self, end: int) -> None:
        """Cut the growth headroom off the file: it ends at ``end`` or what is used."""
        end = max(self.used_end, end)
        if self.length > end and self.node.length() > end:
            await self.node.driver.truncate(end)
            self.length = end

    # --- host I/O in flight outside the metadata lock ----------------------------------------

    def register(self, first_cluster: int, end_cluster: int) -> int:
        """Record host clusters [first, end) as under I/O; returns the token to release."""
        self._token += 1
        self._in_flight[self._token] = (first_cluster, end_cluster)
        return self._token

    def release(self, token: int) -> None:
        self._in_flight.pop(token, None)

    def in_flight(self, cluster: int) -> bool:
        return any(lo <= cluster < hi for lo, hi in self._in_flight.values())

    @property
    def any_in_flight(self) -> bool:
        return bool(self._in_flight)
