"""Graph edits and node commands of qapi/block-core.json: block_resize, blockdev-snapshot,
blockdev-snapshot-sync, blockdev-reopen, change-backing-file, block-set-write-threshold and
query-blockstats (cf. blockdev.c, block/monitor/block-hmp-cmds.c, block/qapi.c).

The graph work lives in the block layer (``block/snapshot.py``, ``block/reopen.py``,
``block/write_threshold.py``, ``block/stats.py``); these handlers look nodes up with QEMU's
texts and call it. The snapshot commands are transactions of one action
(``qmp/commands/transaction.py``), as in QEMU.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from blockmirror.block.backing_file import write_backing_file
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, BlockNode, Child, Perm
from blockmirror.block.options import unref_node
from blockmirror.block.reopen import check_read_only, set_read_only
from blockmirror.block.stats import BlockStats
from blockmirror.block.write_threshold import set_write_threshold
from blockmirror.errors import BlockIOError, BlockMirrorError
from blockmirror.qmp.commands.mirror import get_root_node
from blockmirror.qmp.commands.transaction import run_transaction
from blockmirror.qmp.registry import Args, CommandContext, command

# --- block_resize ----------------------------------------------------------------------------


@command("block_resize")
async def block_resize(ctx: CommandContext, args: Args) -> None:
    """cf. qmp_block_resize and bdrv_co_truncate."""
    graph = ctx.daemon.graph
    device = args.opt_str("device")
    node = graph.lookup(device, args.opt_str("node-name"))
    size = args.get_int("size")
    if size < 0:
        raise BlockMirrorError("Parameter 'size' expects a >0 size")
    if node.blockers.get("resize") or node.blockers.get("all"):
        raise BlockMirrorError(f"Device '{device if device is not None else '(null)'}' is in use")
    # a user that needs RESIZE for the duration (cf. blk_new_with_bs(bs, BLK_PERM_RESIZE))
    blk = BlockBackend("", "an unnamed block device", Perm.RESIZE, Perm.all())
    graph.attach(blk, node, "root", Perm.RESIZE, Perm.all())
    try:
        await _truncate(node, size)
    finally:
        if blk.child is not None:
            graph.detach(blk.child)


async def _truncate(node: BlockNode, size: int) -> None:
    target = node.truncate_target()
    if target.read_only:
        raise BlockMirrorError("Image is read-only")
    if target.format_name == "qcow2" and size % 512:
        raise BlockMirrorError("The new size must be a multiple of 512")
    await target.drain()
    try:
        await target.driver.truncate(size)
        # cf. bdrv_dirty_bitmap_truncate: every layer's bitmaps follow the new length
        layer: BlockNode | None = node
        while layer is not None:
            layer.bitmaps.resize(layer.length())
            layer = layer.filtered_child() if layer is not target else None
    except BlockIOError as e:
        if target.format_name == "qcow2" and e.errno == errno.EFBIG:
            raise BlockMirrorError(
                f"Failed to grow the L1 table: {os.strerror(errno.EFBIG)}") from e
        raise


# --- snapshots ---------------------------------------------------------------------------


@command("blockdev-snapshot-sync")
async def blockdev_snapshot_sync(ctx: CommandContext, args: Args) -> None:
    await run_transaction(ctx, [{"type": "blockdev-snapshot-sync", "data": args.as_dict()}],
                          {})


@command("blockdev-snapshot")
async def blockdev_snapshot(ctx: CommandContext, args: Args) -> None:
    await run_transaction(ctx, [{"type": "blockdev-snapshot", "data": args.as_dict()}], {})


# --- change-backing-file ------------------------------------------------------------------


@command("change-backing-file")
async def change_backing_file(ctx: CommandContext, args: Args) -> None:
    """cf. qmp_change_backing_file: the checks, then the image header is rewritten."""
    graph = ctx.daemon.graph
    device = args.get_str("device")
    root = get_root_node(graph, device)
    image = graph.lookup(None, args.get_str("image-node-name"))
    if image.backing is None:
        raise BlockMirrorError(
            "not allowing backing file change on an image without a backing file")
    reasons = root.blockers.get("change") or root.blockers.get("all")
    if reasons:
        raise BlockMirrorError(f"Node '{root.name}' is busy: {reasons[0]}")
    if image not in root.backing_chain():
        raise BlockMirrorError(f"'{device}' and image file are not in the same chain")
    backing_file = args.get_str("backing-file")
    was_ro = image.read_only
    if was_ro:
        await set_read_only(graph, image, False)
    try:
        await write_backing_file(image, backing_file, image.format_name)
    finally:
        if was_ro:
            await set_read_only(graph, image, True)


# --- write threshold -----------------------------------------------------------------------


@command("block-set-write-threshold")
async def block_set_write_threshold(ctx: CommandContext, args: Args) -> None:
    name = args.get_str("node-name")
    node = ctx.daemon.graph.find_node(name)
    if node is None:
        raise BlockMirrorError(f"Device '{name}' not found")
    set_write_threshold(node, args.get_int("write-threshold"), ctx.daemon.events.emit)


# --- query-blockstats ----------------------------------------------------------------------


def _primary(node: BlockNode) -> BlockNode | None:
    """cf. bdrv_primary_child, then a unique data child."""
    for role in ("file", "image"):
        if role in node.children:
            return node.children[role].node
    if node.driver.is_filter:
        return node.filtered_child()
    return None


def _driver_specific(node: BlockNode) -> dict[str, Any] | None:
    """cf. raw_get_specific_stats: the file driver counts the discards that reached it."""
    if node.format_name not in ("file", "host_device"):
        return None
    c = node.stats.counters["unmap"]
    ok = c.ops if node.discard_unmap else 0
    return {"driver": node.format_name, "discard-nb-ok": ok,
            "discard-nb-failed": c.failed if node.discard_unmap else 0,
            "discard-bytes-ok": c.bytes if node.discard_unmap else 0}


def _bds_stats(node: BlockNode, blk_level: bool, counters: bool) -> dict[str, Any]:
    """cf. bdrv_query_bds_stats."""
    if blk_level:
        node = node.skip_implicit_filters()
    out: dict[str, Any] = {"node-name": node.name,
                           "stats": node.stats.to_qapi(counters=counters)}
    spec = _driver_specific(node)
    if spec is not None:
        out["driver-specific"] = spec
    parent = _primary(node)
    if parent is not None:
        out["parent"] = _bds_stats(parent, blk_level, counters)
    if blk_level:
        cow = node.backing if not node.driver.is_filter else node.filtered_child()
        if cow is not None:
            out["backing"] = _bds_stats(cow, blk_level, counters)
    return out


@command("query-blockstats")
async def query_blockstats(ctx: CommandContext, args: Args) -> list[dict[str, Any]]:
    """Node entries show QEMU's numbers (qemu-storage-daemon accounts no node-level I/O:
    0, but ``wr_highest_offset``); ``__org.blockmirror_counters`` adds the real per-node
    counters. Named BlockBackends (devices) always show the real counters of their node."""
    graph = ctx.daemon.graph
    counters = args.get_bool("__org.blockmirror_counters", False)
    if args.get_bool("query-nodes", False):
        ordered = sorted(graph.all_nodes(), key=lambda n: _creation_index(graph, n))
        return [_bds_stats(n, False, counters) for n in ordered if not n.implicit]
    out = []
    for blk in graph.backends:
        if not blk.name:
            continue
        entry: dict[str, Any] = {"device": blk.name}
        if blk.node is not None:
            entry.update(_bds_stats(blk.node, True, True))
        else:
            entry["stats"] = BlockStats().to_qapi()
        out.append(entry)
    return out


def _creation_index(graph: BlockGraph, node: BlockNode) -> int:
    # nodes are kept in creation order by the graph's dict (cf. all_bdrv_states)
    return list(graph.nodes).index(node.name)


# --- blockdev-reopen -----------------------------------------------------------------------

#: options no driver lets a reopen change (the others are taken, and stored)
_FIXED = {"filename", "server", "export", "offset", "size", "image", "config", "driver",
          "node-name"}
_HANDLED = {"read-only", "backing", "file"}


@command("blockdev-reopen")
async def blockdev_reopen(ctx: CommandContext, args: Args) -> None:
    """cf. qmp_blockdev_reopen: every entry is checked before any is applied (read-only
    switches and backing changes)."""
    graph = ctx.daemon.graph
    plan: list[tuple[BlockNode, bool, Any, dict[str, Any]]] = []
    for opts in args["options"]:
        name = opts.get("node-name")
        if name is None:
            raise BlockMirrorError("node-name not specified")
        node = graph.find_node(name)
        if node is None:
            raise BlockMirrorError(f"Failed to find node with node-name='{name}'")
        for key in node.options:
            if key in _FIXED - {"driver", "node-name"} and key not in opts:
                raise BlockMirrorError(f"Option '{key}' cannot be reset to its default value")
        if opts["driver"] != node.format_name:
            raise BlockMirrorError("Cannot change the option 'driver'")
        for key, value in opts.items():
            if key in _FIXED and node.options.get(key, value) != value:
                raise BlockMirrorError(f"Cannot change the option '{key}'")
        backing: Any = "keep"
        if type(node.driver).supports_backing:
            if "backing" not in opts:
                if node.backing is not None:
                    raise BlockMirrorError(f"backing is missing for '{name}'")
            elif opts["backing"] is None:
                backing = None
            elif isinstance(opts["backing"], str):
                new = graph.lookup(opts["backing"], opts["backing"])
                if new is node or node in new.backing_chain():
                    raise BlockMirrorError(
                        f"Making '{new.name}' a backing child of '{name}' would create a cycle")
                backing = new
            else:
                raise BlockMirrorError("Cannot change the option 'backing'")
        elif opts.get("backing") is not None:
            raise BlockMirrorError(f"Driver '{node.format_name}' of node '{name}' does not "
                                   "support backing files")
        file = opts.get("file")
        if file is not None and (not isinstance(file, str) or node.file is None
                                 or node.file.name != file):
            _check_new_file(graph, node, file, bool(opts.get("read-only", False)))
            raise BlockMirrorError("Cannot change the option 'file'")
        ro = bool(opts.get("read-only", False))
        if ro and not node.read_only:
            check_read_only(node)
        extra = {k: v for k, v in opts.items() if k not in _FIXED and k not in _HANDLED}
        plan.append((node, ro, backing, extra))
    for node, ro, backing, extra in plan:
        if backing != "keep":
            await _set_backing(graph, node, backing)
        await set_read_only(graph, node, ro)
        # runtime options blockmirror does not act on are kept, as the node's options say
        node.options.update(extra)


def _check_new_file(graph: BlockGraph, node: BlockNode, name: object, read_only: bool) -> None:
    """Another ``file`` child: QEMU replaces it; blockmirror only reports the permission
    conflict QEMU would find first (then refuses the change)."""
    if not isinstance(name, str):
        return
    new = graph.find_node(name)
    if new is None or node.file is None:
        return
    link = node.children["file"]
    perm = Perm.CONSISTENT_READ if read_only else link.perm
    graph.check_perms(new, Child(node, new, "file", perm, link.shared))


async def _set_backing(graph: BlockGraph, node: BlockNode, backing: BlockNode | None
                       ) -> None:
    link = node.children.get("backing")
    if link is not None and backing is not None and link.node is backing:
        return
    if backing is not None:
        graph.attach(node, backing, "backing", Perm.CONSISTENT_READ, Perm.all())
    if link is not None:
        old = link.node
        if backing is None or link is not node.children.get("backing"):
            graph.detach(link)
        # an old backing nobody else holds is closed (cf. bdrv_unref of the old child)
        await unref_node(graph, old)
