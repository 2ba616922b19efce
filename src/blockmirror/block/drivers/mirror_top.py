"""The ``mirror_top`` filter: the node a mirror job inserts above its source (cf. block/mirror.c).

Every request passes straight to the ``backing`` child (the source). The filter exists so the
source's parents can be moved as one (its insertion and removal are ``replace_node`` calls) and
so the job can be named in the graph (``filter-node-name``); dirty tracking and active
mirroring hook the source node itself (``jobs/mirror/``), so writes that bypass the filter
are seen too. Implicit (unnamed) filters are hidden from queries by ``BlockNode.implicit``.
"""

from __future__ import annotations

import asyncio
import errno

from blockmirror.block.driver import BlockDriver, DriverInfo, Extent, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError


@register
class MirrorTopDriver(BlockDriver):
    format_name = "mirror_top"
    is_filter = True
    #: FUA passes through to the source, which honours it (cf. bdrv_mirror_top_open's
    #: supported_write_flags); otherwise a writethrough guest's every write would flush twice
    supports_fua = True

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        #: set by the job while it drains the source before the pivot (cf. drained_begin)
        self.quiesced = False
        self._resume = asyncio.Event()
        self._resume.set()
        #: where the filter's parents went when it was removed: requests that were held at
        #: the gate across the pivot continue there, as QEMU's would after the drain
        self.redirect: BlockNode | None = None

    def quiesce(self, on: bool) -> None:
        self.quiesced = on
        if on:
            self._resume.clear()
        else:
            self._resume.set()

    async def _gate(self) -> None:
        while self.quiesced:
            await self._resume.wait()

    def _child(self) -> BlockNode:
        child = self.node.backing or self.redirect
        if child is None:
            raise BlockIOError(errno.ENOMEDIUM, "No medium found")
        return child

    def length(self) -> int:
        child = self.node.backing or self.redirect
        return child.length() if child is not None else 0

    def info(self) -> DriverInfo:
        return self._child().info()

    def has_zero_init(self) -> bool:
        return self._child().driver.has_zero_init()

    async def preadv(self, offset: int, length: int) -> bytes:
        return await self._child().read(offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        await self._gate()
        await self._child().write(offset, data, fua=WriteFlags.FUA in flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self._gate()
        await self._child().write_zeroes(
            offset, length, may_unmap=WriteFlags.MAY_UNMAP in flags, fua=WriteFlags.FUA in flags,
            no_fallback=WriteFlags.NO_FALLBACK in flags,
        )

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._gate()
        await self._child().discard(offset, length)

    async def flush(self) -> None:
        await self._child().flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self._child().block_status(offset, length)


def make_filter_node(name: str, source: BlockNode, implicit: bool) -> BlockNode:
    """A detached mirror_top node shaped after ``source`` (link it with the graph)."""
    node = BlockNode(name=name, implicit=implicit, read_only=source.read_only,
                     discard_unmap=True, filename=source.filename,
                     options={"driver": "mirror_top", "node-name": name})
    node.driver = MirrorTopDriver(node)
    return node


__all__ = ["MirrorTopDriver", "make_filter_node"]
