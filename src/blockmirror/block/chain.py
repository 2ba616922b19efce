"""Block status over a backing chain: the one chain walker (cf. block/io.c).

``block_status_above(top, base, offset, length)`` answers for a range as a reader of ``top``
sees it, asking each layer from ``top`` down to (not including) ``base`` until one allocates
the range: cf. bdrv_co_block_status_above / bdrv_co_common_block_status_above. Filters count
as layers, a range past the end of a shorter backing reads as allocated zeroes, and ``depth``
says which layer answered (1 = ``top``). ``is_allocated_above`` is the yes/no form, cf.
bdrv_co_is_allocated_above. The NBD server's block status, ``blockmirror map`` and the
mirror's copy and seeding all walk chains through these two functions.
"""

from __future__ import annotations

from blockmirror.block.driver import BlockStatus, Extent
from blockmirror.block.node import BlockNode


def _next_layer(node: BlockNode) -> BlockNode | None:
    """cf. bdrv_filter_or_cow_bs: a filter's child, else the backing."""
    return node.filtered_child() or node.backing


async def block_status_above(
    top: BlockNode,
    base: BlockNode | None,
    offset: int,
    length: int,
    *,
    include_base: bool = False,
    want_zero: bool = True,
) -> Extent:
    """Status of the range as seen through ``top``, down to (excluding) ``base``.

    ``depth`` of the result counts the layers queried (1 = top); cf.
    bdrv_co_common_block_status_above.
    """
    if not include_base and top is base:
        return Extent(length, BlockStatus.NONE, 0)
    ext = await top.block_status(offset, length, want_zero)
    depth = 1
    if ext.status & BlockStatus.ALLOCATED or top is base:
        return Extent(ext.length, ext.status, depth, ext.map_offset, ext.map_node)
    eof = offset + ext.length if ext.status & BlockStatus.EOF else None
    n = min(length, ext.length)
    result = ext
    p = _next_layer(top)
    while p is not None and (include_base or p is not base):
        depth += 1
        plen = p.length()
        if offset >= plen:
            # the layer is short: zeroes beyond its end count as allocated here
            result = Extent(n, BlockStatus.ZERO | BlockStatus.ALLOCATED, depth)
            break
        pe = await p.block_status(offset, min(n, plen - offset), want_zero)
        if pe.status & BlockStatus.ALLOCATED:
            result = Extent(pe.length, pe.status & ~BlockStatus.EOF, depth, pe.map_offset,
                            pe.map_node)
            break
        result = pe
        n = pe.length
        if p is base:
            break
        p = _next_layer(p)
    else:
        result = Extent(n, result.status & ~BlockStatus.EOF, depth, result.map_offset,
                        result.map_node)
    status = result.status
    if eof is not None and offset + result.length == eof:
        status |= BlockStatus.EOF
    return Extent(result.length, status, depth, result.map_offset, result.map_node)


async def is_allocated_above(
    top: BlockNode,
    base_overlay: BlockNode | None,
    include_base: bool,
    offset: int,
    length: int,
) -> tuple[bool, int]:
    """(allocated, bytes) for the range: allocated in any layer from ``top`` to ``base_overlay``.

    cf. bdrv_co_is_allocated_above; the mirror's sync=top seeds its bitmap with it.
    """
    ext = await block_status_above(top, base_overlay, offset, length, include_base=include_base,
                                   want_zero=False)
    return bool(ext.status & BlockStatus.ALLOCATED), ext.length



__all__ = ["block_status_above", "is_allocated_above"]
