"""Block status of QEMU's own NBD meta contexts (cf. QEMU's nbd/server.c):
``qemu:dirty-bitmap:NAME`` (bit 0: dirty) and ``qemu:allocation-depth`` (the layer of the
backing chain that allocates the range: 0 unallocated, 1 the exported node, 2 its backing...).

Both answer a range ``[offset, offset + length)`` with extents ``(length, flags)`` that cover it
from its start, neighbours with equal flags merged, at most ``limit`` of them (1 for
NBD_CMD_FLAG_REQ_ONE); a result cut short by the limit covers a prefix of the range.
"""

from __future__ import annotations

from blockmirror.block.bitmaps import NamedBitmap
from blockmirror.block.chain import block_status_above
from blockmirror.block.driver import BlockStatus
from blockmirror.block.node import BlockNode
from blockmirror.nbd.constants import NBD_STATE_DIRTY

#: extents in one reply for QEMU's contexts (cf. NBD_MAX_BLOCK_STATUS_EXTENTS)
MAX_CONTEXT_EXTENTS = 1024 * 1024 // 8
#: the largest extent length the wire carries
_MAX_EXTENT = 0xFFFFFFFF


class _Extents:
    """cf. NBDExtentArray: append-only, merging, bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[tuple[int, int]] = []

    def add(self, length: int, flags: int) -> bool:
        """Append; False once the array is full (the extent was not taken)."""
        if length == 0:
            return True
        if self.items and self.items[-1][1] == flags:
            total = self.items[-1][0] + length
            if total <= _MAX_EXTENT:
                self.items[-1] = (total, flags)
                return True
        if len(self.items) >= self.limit:
            return False
        self.items.append((length, flags))
        return True


def bitmap_extents(
    named: NamedBitmap, offset: int, length: int, limit: int = MAX_CONTEXT_EXTENTS
) -> list[tuple[int, int]]:
    """cf. bitmap_to_extents: clean and dirty runs of the bitmap over the range."""
    extents = _Extents(limit)
    end = offset + length
    start = offset
    for run_start, run_length in named.bitmap.runs(offset, end):
        dirty_start = max(run_start, offset)
        dirty_end = min(run_start + run_length, end)
        if not extents.add(dirty_start - start, 0) or not extents.add(
            dirty_end - dirty_start, NBD_STATE_DIRTY
        ):
            return extents.items
        start = dirty_end
    extents.add(end - start, 0)
    return extents.items


async def allocation_depth_extents(
    node: BlockNode, offset: int, length: int, limit: int = MAX_CONTEXT_EXTENTS
) -> list[tuple[int, int]]:
    """cf. blockalloc_to_extents over bdrv_is_allocated_above(node, NULL, false, ...)."""
    extents = _Extents(limit)
    while length > 0:
        status = await block_status_above(node, None, offset, length)
        count = min(status.length, length)
        depth = status.depth if status.status & BlockStatus.ALLOCATED else 0
        if not extents.add(count, depth):
            break
        offset += count
        length -= count
    return extents.items
