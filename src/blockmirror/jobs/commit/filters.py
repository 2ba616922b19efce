"""The filter nodes commit and stream insert above a node: ``commit_top`` (cf. block/commit.c's
bdrv_commit_top) and ``copy-on-read`` (cf. block/copy-on-read.c, as block-stream uses it).

Both pass every request to their one child (``block/drivers/passthrough.py``): ``commit_top``
to its ``backing`` (the top of the committed range), ``copy-on-read`` to its ``file`` (the node
being streamed into). They exist so that the node's users can be moved as one (inserting and
removing them are ``replace_node`` calls) and so the graph names the job
(``filter-node-name``). The stream's copying itself is done by the job (``stream.py``), not by
guest reads through the filter.
These drivers are not registered: blockdev-add cannot open them, as in QEMU's 7.2 for
``commit_top``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from blockmirror.block.drivers.passthrough import PassThroughFilter, link_above, unlink
from blockmirror.block.graph import BlockGraph, id_wellformed
from blockmirror.block.node import BlockNode, Child, Perm
from blockmirror.block.query import qemu_json
from blockmirror.errors import BlockMirrorError


class _PassThrough(PassThroughFilter):
    #: the link to the child derives its permissions from the filter's users (``attach``)
    passthrough: ClassVar[bool] = False


class CommitTopDriver(_PassThrough):
    format_name = "commit_top"
    role = "backing"


class CopyOnReadDriver(_PassThrough):
    format_name = "copy-on-read"
    role = "file"
    passthrough = True


def check_node_name(graph: BlockGraph, name: str) -> None:
    """cf. bdrv_assign_node_name's checks and texts.

    Raises:
        BlockMirrorError: malformed, a device's name, taken, or too long.
    """
    if not id_wellformed(name):
        raise BlockMirrorError(f"Invalid node-name: '{name}'")
    if graph.find_backend(name) is not None:
        raise BlockMirrorError(f"node-name={name} is conflicting with a device id")
    if graph.find_node(name) is not None:
        raise BlockMirrorError(f"Duplicate nodes with node-name='{name}'")
    if len(name) >= 32:
        raise BlockMirrorError("Node name too long")


def insert_filter(graph: BlockGraph, driver: type[_PassThrough], below: BlockNode,
                  name: str | None, options: dict[str, object]) -> tuple[BlockNode, Child]:
    """cf. bdrv_append / bdrv_insert_node: a new filter above ``below`` takes its parents.

    The filter takes nothing of its child and shares everything (its users' permissions are
    the job's business, cf. bdrv_commit_top_child_perm). Returns the filter and its link.

    Raises:
        BlockMirrorError: an invalid or duplicate node name; a permission conflict.
    """
    if name is not None:
        check_node_name(graph, name)
    node_name = name or graph.new_auto_name()
    # commit_top is opened without BDRV_O_RDWR (it is never written through); copy-on-read
    # names itself by its options, as QEMU 7.2 reports it
    read_only = True if driver is CommitTopDriver else below.read_only
    filename = below.filename if driver is CommitTopDriver else "json:" + qemu_json(
        {"driver": driver.format_name, driver.role: _spec(below)})
    node = BlockNode(name=node_name, implicit=name is None, read_only=read_only,
                     discard_unmap=True, filename=filename,
                     options={"driver": driver.format_name, "node-name": node_name, **options})
    node.driver = driver(node)
    # copy-on-read passes its users' needs on (a filter's default); commit_top takes
    # nothing (cf. bdrv_commit_top_child_perm)
    return node, link_above(graph, node, below, Perm.NONE, passthrough=driver.passthrough)


def _spec(node: BlockNode) -> Any:
    """A node as a json: filename spells it: its own json, or driver and filename/file."""
    if node.filename.startswith("json:"):
        return json.loads(node.filename[5:])
    if node.file is None or node.format_name in ("file", "host_device"):
        return {"driver": node.format_name, "filename": node.filename}
    return {"driver": node.format_name, "file": _spec(node.file)}


def remove_filter(graph: BlockGraph, node: BlockNode) -> None:
    """cf. bdrv_replace_node(filter, child) and dropping it: the parents go back down."""
    link = node.children.get(node.driver.role) if isinstance(node.driver, _PassThrough) \
        else None
    if link is None:
        graph.forget_node(node)
        return
    unlink(graph, node, link)


__all__ = ["CommitTopDriver", "CopyOnReadDriver", "check_node_name", "insert_filter",
           "remove_filter"]
