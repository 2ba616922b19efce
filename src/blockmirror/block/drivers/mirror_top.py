"""The ``mirror_top`` filter: the node a mirror job inserts above its source (cf. block/mirror.c).

Every request passes straight to the ``backing`` child (the source). The filter exists so the
source's parents can be moved as one (its insertion and removal are ``replace_node`` calls) and
so the job can be named in the graph (``filter-node-name``); dirty tracking and active
mirroring hook the source node itself (``jobs/mirror/``), so writes that bypass the filter
are seen too. Implicit (unnamed) filters are hidden from queries by ``BlockNode.implicit``.
"""

from __future__ import annotations

import asyncio

from blockmirror.block.driver import DriverInfo, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.block.drivers.passthrough import PassThroughFilter
from blockmirror.block.node import BlockNode


@register
class MirrorTopDriver(PassThroughFilter):
    """``redirect``: where the filter's parents went when it was removed; requests that were
    held at the gate across the pivot continue there, as QEMU's would after the drain."""

    format_name = "mirror_top"
    role = "backing"
    #: FUA passes through to the source, which honours it (cf. bdrv_mirror_top_open's
    #: supported_write_flags); otherwise a writethrough guest's every write would flush twice
    supports_fua = True

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        #: set by the job while it drains the source before the pivot (cf. drained_begin)
        self.quiesced = False
        self._resume = asyncio.Event()
        self._resume.set()

    def quiesce(self, on: bool) -> None:
        self.quiesced = on
        if on:
            self._resume.clear()
        else:
            self._resume.set()

    async def _gate(self) -> None:
        while self.quiesced:
            await self._resume.wait()

    def info(self) -> DriverInfo:
        return self._child().info()

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        await self._gate()
        await super().pwritev(offset, data, flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self._gate()
        await super().pwrite_zeroes(offset, length, flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._gate()
        await super().pdiscard(offset, length)


__all__ = ["MirrorTopDriver"]
