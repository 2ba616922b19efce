"""Shared steps of commit and stream on a backing chain: growing the base, dropping the nodes
above it once the data is there (cf. bdrv_drop_intermediate) and closing what is left unused.
"""

from __future__ import annotations

import logging

from blockmirror.block import options
from blockmirror.block.backing_file import write_backing_file
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode
from blockmirror.block.reopen import set_read_only
from blockmirror.errors import BlockMirrorError

log = logging.getLogger(__name__)

#: how much one commit or stream step covers (cf. COMMIT_BUFFER_SIZE, STREAM_CHUNK)
CHUNK = 512 * 1024


async def grow(node: BlockNode, length: int) -> None:
    """Truncate ``node`` (or the first node below its filters that can) up to ``length``."""
    target = node.truncate_target()
    await target.driver.truncate(length)
    layer: BlockNode | None = node
    while layer is not None:
        layer.bitmaps.resize(layer.length())
        layer = layer.filtered_child() if layer is not target else None


async def update_backing_name(graph: BlockGraph, overlay: BlockNode, name: str,
                              fmt: str) -> None:
    """cf. bdrv_child_cb_update_filename: record ``name`` as ``overlay``'s backing file,
    reopening a read-only overlay for the write and back.

    Raises:
        BlockMirrorError: QEMU's "Could not update backing file link" failure.
    """
    read_only = overlay.read_only
    if read_only:
        await set_read_only(graph, overlay, False)
    try:
        await write_backing_file(overlay, name, fmt)
    finally:
        if read_only:
            try:
                await set_read_only(graph, overlay, True)
            except BlockMirrorError:
                log.exception("making %s read-only again", overlay.name)


async def drop_intermediate(graph: BlockGraph, top: BlockNode, base: BlockNode,
                            backing_file: str | None) -> None:
    """cf. bdrv_drop_intermediate: every parent of ``top`` now uses ``base``; an overlay whose
    backing moved records ``backing_file`` (default: the base's filename) in its header.

    Raises:
        BlockMirrorError: the parents cannot move (permissions), or a header update failed.
    """
    name = backing_file if backing_file is not None else base.filename
    updated = list(top.parents)
    graph.replace_node(top, base)
    for link in updated:
        parent = link.parent
        if isinstance(parent, BlockNode) and link.role == "backing" \
                and parent.format_name == "qcow2":
            await update_backing_name(graph, parent, name, base.format_name)


async def close_unused(graph: BlockGraph, nodes: list[BlockNode]) -> None:
    """Close the nodes nobody references any more (and their children left unused)."""
    for node in nodes:
        if node.name in graph.nodes and graph.refcount(node) == 0:
            try:
                await options.close_node(graph, node)
            except BlockMirrorError:
                log.exception("closing %s after the job", node.name)


__all__ = ["CHUNK", "close_unused", "drop_intermediate", "grow", "update_backing_name"]
