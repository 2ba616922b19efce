"""The ``null-co`` / ``null-aio`` protocol drivers: a sink of a given size (cf. block/null.c).

Writes vanish, reads return zeroes. Block status is neither DATA nor ZERO unless
``read-zeroes`` is on, so a mirror from a null node discards on the target, as QEMU's does.
"""

from __future__ import annotations

import asyncio

from blockmirror.block.driver import BlockDriver, BlockStatus, Extent, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.errors import BlockMirrorError

_DEFAULT_SIZE = 1 << 30


@register
class NullCoDriver(BlockDriver):
    format_name = "null-co"
    supports_fua = True

    size = _DEFAULT_SIZE
    read_zeroes = False
    latency_ns = 0

    async def open(self) -> None:
        opts = self.node.options
        size = opts.get("size", _DEFAULT_SIZE)
        latency = opts.get("latency-ns", 0)
        read_zeroes = opts.get("read-zeroes", False)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BlockMirrorError("Parameter 'size' expects a non-negative value")
        if not isinstance(latency, int) or isinstance(latency, bool) or latency < 0:
            raise BlockMirrorError("latency-ns is invalid")
        if not isinstance(read_zeroes, bool):
            raise BlockMirrorError("Invalid parameter type for 'read-zeroes', expected: boolean")
        self.size, self.latency_ns, self.read_zeroes = size, latency, read_zeroes

    async def _delay(self) -> None:
        if self.latency_ns:
            # on the graph's clock, so that under a virtual clock a latency (up to the
            # 584 years a uint64 allows) passes when the clock is moved, not in real time
            graph = self.node.graph
            clock = getattr(graph, "clock", None) if graph is not None else None
            if clock is not None:
                await clock.sleep_ns(self.latency_ns)
            else:
                await asyncio.sleep(self.latency_ns / 1e9)

    def length(self) -> int:
        return self.size

    def has_zero_init(self) -> bool:
        return self.read_zeroes

    async def preadv(self, offset: int, length: int) -> bytes:
        await self._delay()
        return bytes(length)

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        await self._delay()

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self._delay()

    async def flush(self) -> None:
        await self._delay()

    async def block_status(self, offset: int, length: int) -> Extent:
        status = BlockStatus.OFFSET_VALID
        if self.read_zeroes:
            status |= BlockStatus.ZERO | BlockStatus.ALLOCATED
        return Extent(length, status, 0, offset, self.node)


@register
class NullAioDriver(NullCoDriver):
    format_name = "null-aio"
