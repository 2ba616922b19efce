"""Switching a node between read-only and read-write at run time (cf. bdrv_reopen_set_read_only).

Used by blockdev-snapshot (the old top becomes read-only when the overlay is committed),
blockdev-reopen and change-backing-file. The switch covers the node and the children that
inherited its options (those not added by the monitor on their own): their links are given
the permissions the new mode needs, a file opened read-only gets a read-write descriptor, and
the graph re-takes the image locks.
"""

from __future__ import annotations

from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode, Perm
from blockmirror.errors import BlockMirrorError

_STORAGE_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


def _inheriting_children(graph: BlockGraph, node: BlockNode) -> list[BlockNode]:
    return [link.node for role, link in node.children.items()
            if role != "backing" and link.node.name not in graph.monitor_owned]


def check_read_only(node: BlockNode) -> None:
    """A node some parent writes through cannot become read-only (cf. the permission check
    of bdrv_reopen_multiple)."""
    for link in node.parents:
        if link.perm & Perm.WRITE:
            raise BlockMirrorError(
                f"Read-only block node '{node.name}' cannot support read-write users")


async def set_read_only(graph: BlockGraph, node: BlockNode, read_only: bool) -> None:
    """Switch ``node`` (and the children that inherited its mode).

    Raises:
        BlockMirrorError: a parent still writes (to read-only), or a file cannot be reopened
            for writing (to read-write).
    """
    if read_only and node.read_only != read_only:
        check_read_only(node)
    await _switch(graph, node, read_only)


async def _switch(graph: BlockGraph, node: BlockNode, read_only: bool) -> None:
    # children are switched from here: their only writer is the node going read-only
    if node.read_only == read_only:
        return
    if read_only:
        try:
            await node.drain()
            # what the driver holds back for later writes goes back first (qcow2's clusters
            # taken ahead): a read-only image cannot give it back at close
            give_back = getattr(node.driver, "before_read_only", None)
            if give_back is not None:
                await give_back()
            await node.flush()
        except BlockMirrorError:
            pass  # QEMU reopens anyway; the flush error was already reported to writers
    else:
        reopen = getattr(node.driver, "reopen_read_write", None)
        if reopen is not None:
            await reopen()
    for child in _inheriting_children(graph, node):
        await _switch(graph, child, read_only)
    node.read_only = read_only
    # what the node takes on its storage follows its mode (cf. bdrv_default_perms)
    for role, link in node.children.items():
        if role == "backing" or link.passthrough:
            continue
        link.perm = Perm.CONSISTENT_READ if read_only else (
            Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE)
        graph.refresh_perms(link.node, best_effort=read_only)
    graph.refresh_perms(node, best_effort=read_only)


__all__ = ["check_read_only", "set_read_only"]
