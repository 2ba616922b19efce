"""A tiny in-memory format driver for mirror tests, with clusters, zero clusters and a backing.

Each cluster is unallocated (reads come from the backing, or zeroes), DATA, or ZERO. Partial
writes to an unallocated cluster copy the backing's cluster first (copy-on-write), like qcow2.
Block status reports runs of equal cluster state, so the mirror's copy / zero / discard split
and sync=top/full seeding are exercised without files. Errors can be injected per operation.
"""

from __future__ import annotations

import asyncio
from typing import Any

from blockmirror.block.driver import BlockDriver, BlockStatus, DriverInfo, Extent, WriteFlags
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, BlockNode, Perm
from blockmirror.errors import BlockIOError

UNALLOC, DATA, ZERO = 0, 1, 2


class MemoryDriver(BlockDriver):
    format_name = "memory"
    is_format = True
    can_write_zeroes_with_unmap = True

    def __init__(self, node: BlockNode, size: int, cluster: int, backing_name: str | None) -> None:
        super().__init__(node)
        self.size = size
        self.cluster = cluster
        self.buf = bytearray(size)
        self.state = bytearray((size + cluster - 1) // cluster)
        self.backing_name = backing_name
        #: operation -> errno to fail with ("read", "write", "zero", "discard", "flush")
        self.fail: dict[str, int] = {}
        self.fail_once = True
        self.calls: dict[str, int] = {}
        #: seconds every flush takes (to hold a job in its final drain)
        self.flush_delay = 0.0
        #: while set to an unset event, every flush waits for it (a test holds a drain open)
        self.flush_gate: asyncio.Event | None = None

    def length(self) -> int:
        return self.size

    def info(self) -> DriverInfo:
        return DriverInfo(cluster_size=self.cluster, backing_filename=self.backing_name)

    def has_zero_init(self) -> bool:
        return True

    def _maybe_fail(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        err = self.fail.get(op)
        if err is not None:
            if self.fail_once:
                del self.fail[op]
            raise BlockIOError(err)

    async def _cluster_bytes(self, idx: int) -> bytes:
        start = idx * self.cluster
        n = min(self.cluster, self.size - start)
        st = self.state[idx]
        if st == DATA:
            return bytes(self.buf[start : start + n])
        if st == UNALLOC and self.node.backing is not None:
            back = self.node.backing
            blen = back.length()
            if start >= blen:
                return bytes(n)
            part = await back.read(start, min(n, blen - start))
            return part + bytes(n - len(part))
        return bytes(n)

    async def preadv(self, offset: int, length: int) -> bytes:
        self._maybe_fail("read")
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            idx = pos // self.cluster
            cstart = idx * self.cluster
            data = await self._cluster_bytes(idx)
            take = min(end, cstart + len(data)) - pos
            out += data[pos - cstart : pos - cstart + take]
            pos += take
        return bytes(out)

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        self._maybe_fail("write")
        pos, end = offset, offset + len(data)
        while pos < end:
            idx = pos // self.cluster
            cstart = idx * self.cluster
            cend = min(cstart + self.cluster, self.size)
            if self.state[idx] != DATA and (pos > cstart or end < cend):
                self.buf[cstart:cend] = await self._cluster_bytes(idx)
            self.state[idx] = DATA
            stop = min(end, cend)
            self.buf[pos:stop] = data[pos - offset : stop - offset]
            pos = stop

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        self._maybe_fail("zero")
        pos, end = offset, offset + length
        while pos < end:
            idx = pos // self.cluster
            cstart = idx * self.cluster
            cend = min(cstart + self.cluster, self.size)
            stop = min(end, cend)
            if pos == cstart and stop == cend:
                self.state[idx] = ZERO
            else:
                await self.pwritev(pos, bytes(stop - pos), WriteFlags.NONE)
            pos = stop

    async def pdiscard(self, offset: int, length: int) -> None:
        self._maybe_fail("discard")
        first = (offset + self.cluster - 1) // self.cluster
        last = (offset + length) // self.cluster
        if offset + length == self.size:
            last = len(self.state)
        for idx in range(first, last):
            self.state[idx] = UNALLOC

    async def flush(self) -> None:
        self._maybe_fail("flush")
        if self.flush_delay:
            await asyncio.sleep(self.flush_delay)
        if self.flush_gate is not None:
            await self.flush_gate.wait()

    async def block_status(self, offset: int, length: int) -> Extent:
        idx = offset // self.cluster
        st = self.state[idx]
        end = min(offset + length, self.size)
        pos = (idx + 1) * self.cluster
        while pos < end and self.state[pos // self.cluster] == st:
            pos += self.cluster
        n = min(pos, end) - offset
        status = {DATA: BlockStatus.DATA | BlockStatus.ALLOCATED,
                  ZERO: BlockStatus.ZERO | BlockStatus.ALLOCATED,
                  UNALLOC: BlockStatus.NONE}[st]
        return Extent(n, status)


def make_device(graph: BlockGraph, node: BlockNode) -> BlockBackend:
    """A guest's device (BlockBackend ``dev``) on ``node``: what its writes go through."""
    dev = BlockBackend("dev", "block device 'dev'", Perm.CONSISTENT_READ | Perm.WRITE, Perm.all())
    graph.attach(dev, node, "root", dev.perm, dev.shared)
    graph.add_backend(dev)
    return dev


def make_node(
    graph: BlockGraph,
    name: str,
    size: int,
    *,
    cluster: int = 4096,
    backing: BlockNode | None = None,
    backing_name: str | None = None,
    discard_unmap: bool = True,
    **opts: Any,
) -> BlockNode:
    """A memory node in ``graph``; ``backing`` is attached, ``backing_name`` only recorded."""
    node = BlockNode(name=name, discard_unmap=discard_unmap, filename=f"memory:{name}",
                     options={"driver": "memory", "node-name": name, **opts})
    node.driver = MemoryDriver(node, size, cluster,
                               backing_name or (backing.name if backing else None))
    graph.add_node(node)
    graph.monitor_owned.add(name)
    if backing is not None:
        graph.attach(node, backing, "backing", Perm.CONSISTENT_READ, Perm.all())
    return node


def drv(node: BlockNode) -> MemoryDriver:
    d = node.driver
    assert isinstance(d, MemoryDriver)
    return d


__all__ = ["DATA", "UNALLOC", "ZERO", "MemoryDriver", "drv", "make_node"]
