"""The ``copy-before-write`` filter a backup job inserts above its source (cf.
block/copy-before-write.c).

Every request passes to the ``file`` child (the source). The copying itself is not done here:
the backup job hooks the source node with a write interceptor (``jobs/backup/cbw.py``), so that
writes reaching the source by any path first copy the old data to the target. The filter
exists so the source's users can be moved onto it as one (``replace_node``), and so the job
can be named in the graph (``filter-node-name``); unnamed filters are implicit and hidden from
queries, as QEMU's are.
"""

from __future__ import annotations

import errno

from blockmirror.block.driver import BlockDriver, DriverInfo, Extent, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError


@register
class CopyBeforeWriteDriver(BlockDriver):
    format_name = "copy-before-write"
    is_filter = True

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        #: where requests go once the filter is out of the graph (requests still queued)
        self.redirect: BlockNode | None = None

    def _child(self) -> BlockNode:
        child = self.node.file or self.redirect
        if child is None:
            raise BlockIOError(errno.ENOMEDIUM, "No medium found")
        return child

    def length(self) -> int:
        child = self.node.file or self.redirect
        return child.length() if child is not None else 0

    def info(self) -> DriverInfo:
        # a filter: the child's cluster size, nothing format-specific (as QEMU reports it)
        return DriverInfo(cluster_size=self._child().info().cluster_size)

    def has_zero_init(self) -> bool:
        return self._child().driver.has_zero_init()

    async def preadv(self, offset: int, length: int) -> bytes:
        return await self._child().read(offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        await self._child().write(offset, data, fua=WriteFlags.FUA in flags)

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self._child().write_zeroes(
            offset, length, may_unmap=WriteFlags.MAY_UNMAP in flags, fua=WriteFlags.FUA in flags,
            no_fallback=WriteFlags.NO_FALLBACK in flags,
        )

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._child().discard(offset, length)

    async def flush(self) -> None:
        await self._child().flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self._child().block_status(offset, length)


def make_cbw_node(name: str, source: BlockNode, implicit: bool) -> BlockNode:
    """A detached copy-before-write node shaped after ``source`` (link it with the graph)."""
    node = BlockNode(name=name, implicit=implicit, read_only=source.read_only,
                     discard_unmap=True, filename=source.filename,
                     options={"driver": "copy-before-write", "node-name": name})
    node.driver = CopyBeforeWriteDriver(node)
    return node


__all__ = ["CopyBeforeWriteDriver", "make_cbw_node"]
