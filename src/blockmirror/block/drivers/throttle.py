"""The ``throttle`` filter: I/O limits of a ``throttle-group`` object (cf. block/throttle.c).

``driver=throttle,throttle-group=ID,file=NODE``: every read, write, zero-write and discard
waits in the group's leaky buckets (``objects/throttle.py``) before it is passed to ``file``;
flushes and block status are not throttled, as in QEMU. The group comes from the graph's
object registry and is held (object-del refuses it) until the node closes.
"""

from __future__ import annotations

import errno

from blockmirror.block.driver import BlockDriver, DriverInfo, Extent, WriteFlags
from blockmirror.block.drivers import register
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.objects.throttle import ThrottleGroup


@register
class ThrottleDriver(BlockDriver):
    format_name = "throttle"
    is_filter = True
    supports_compressed_writes = True  # forwarded (cf. throttle_co_pwritev_compressed)
    supports_fua = True

    def __init__(self, node: BlockNode) -> None:
        super().__init__(node)
        self.group: ThrottleGroup | None = None

    async def open(self) -> None:
        name = self.node.options.get("throttle-group")
        if not isinstance(name, str):
            raise BlockMirrorError("Parameter 'throttle-group' is missing")
        objects = self.node.graph.objects if self.node.graph is not None else None
        group = objects.find(name, ThrottleGroup) if objects is not None else None
        if group is None:
            raise BlockMirrorError(f"Throttle group '{name}' does not exist")
        if self.node.file is None:
            raise BlockMirrorError("Parameter 'file' is missing")
        child = self.node.file.driver
        self.request_alignment = child.request_alignment
        self.max_transfer = child.max_transfer
        self.can_write_zeroes_with_unmap = child.can_write_zeroes_with_unmap
        group.users += 1
        self.group = group

    async def close(self) -> None:
        if self.group is not None:
            self.group.users -= 1
            self.group = None

    def _child(self) -> BlockNode:
        child = self.node.file
        if child is None:
            raise BlockIOError(errno.ENOMEDIUM, "No medium found")
        return child

    async def _limit(self, is_write: bool, size: int) -> None:
        if self.group is not None:
            await self.group.intercept(is_write, size)

    def length(self) -> int:
        child = self.node.file
        return child.length() if child is not None else 0

    def info(self) -> DriverInfo:
        # cf. bdrv_co_get_info on a filter: the child's cluster size; no format-specific data
        return DriverInfo(cluster_size=self._child().info().cluster_size)

    def has_zero_init(self) -> bool:
        return self._child().driver.has_zero_init()

    async def truncate(self, length: int, preallocation: str = "off") -> None:
        await self._child().driver.truncate(length, preallocation)

    async def preadv(self, offset: int, length: int) -> bytes:
        await self._limit(False, length)
        return await self._child().read(offset, length)

    async def pwritev(self, offset: int, data: bytes | memoryview, flags: WriteFlags) -> None:
        await self._limit(True, len(data))
        await self._child().write(offset, data, fua=WriteFlags.FUA in flags)

    async def pwritev_compressed(self, offset: int, data: bytes | memoryview) -> None:
        await self._limit(True, len(data))
        await self._child().write_compressed(offset, data)

    async def pwrite_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self._limit(True, length)
        await self._child().write_zeroes(
            offset, length, may_unmap=WriteFlags.MAY_UNMAP in flags,
            fua=WriteFlags.FUA in flags, no_fallback=WriteFlags.NO_FALLBACK in flags)

    async def pdiscard(self, offset: int, length: int) -> None:
        await self._limit(True, length)
        await self._child().discard(offset, length)

    async def flush(self) -> None:
        await self._child().flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self._child().block_status(offset, length)


__all__ = ["ThrottleDriver"]
