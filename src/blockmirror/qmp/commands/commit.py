"""QMP block-commit and block-stream (cf. blockdev.c qmp_block_commit, qmp_block_stream).

Every check runs in QEMU's order with QEMU's text and error class (block-commit looks the
device up first and answers DeviceNotFound, which libvirt probes for). block-commit picks
active commit (a mirror job of type ``commit``) when ``top`` is the active layer or has a
writer, and intermediate commit otherwise; the jobs live in ``jobs/commit``.
"""

from __future__ import annotations

import os

from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockBackend, BlockNode, Perm
from blockmirror.errors import BlockMirrorError, DeviceNotFound
from blockmirror.jobs.commit import (
    chain_contains,
    filter_or_cow,
    find_base,
    find_overlay,
    start_active_commit,
    start_commit,
    start_stream,
)
from blockmirror.qmp.commands.mirror import get_root_node
from blockmirror.qmp.registry import Args, CommandContext, command


def device_name(node: BlockNode) -> str:
    """cf. bdrv_get_device_name: the name of a named BlockBackend using ``node``, or ''."""
    for c in node.parents:
        if isinstance(c.parent, BlockBackend) and c.parent.name:
            return c.parent.name
    return ""


def check_op(node: BlockNode, op: str) -> None:
    """cf. bdrv_op_is_blocked with QEMU's "Node '%s' is busy: " prefix."""
    for key in (op, "all"):
        reasons = node.blockers.get(key)
        if reasons:
            name = device_name(node) or node.name
            raise BlockMirrorError(f"Node '{name}' is busy: {reasons[0]}")


def c_string(value: str | None) -> str | None:
    """QEMU's C code sees a QMP string up to its first NUL byte."""
    return value.split("\0", 1)[0] if value is not None else None


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    if ":" in a or ":" in b or not a or not b:
        return False
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return False


def find_backing_image(bs: BlockNode, name: str) -> BlockNode | None:
    """cf. bdrv_find_backing_image: the node below ``bs`` opened as ``name`` (the name an
    overlay records, or the backing's own filename)."""
    node: BlockNode | None = bs.skip_filters()
    while node is not None:
        below = node.backing
        if below is None:
            return None
        try:
            recorded = node.info().backing_filename or ""
        except BlockMirrorError:
            recorded = ""
        if name == recorded or _same_file(name, below.filename):
            return below
        node = below.skip_filters()
    return None


def _lookup_node(graph: BlockGraph, name: str) -> BlockNode:
    return graph.lookup(None, name)


def _chain_node(graph: BlockGraph, chain: BlockNode, name: str) -> BlockNode:
    """The node ``name`` (``top-node``, ``base-node``), which must be in ``chain``'s backing
    chain."""
    node = _lookup_node(graph, name)
    if not chain_contains(chain, node):
        raise BlockMirrorError(f"'{name}' is not in this backing file chain")
    return node


@command("block-commit")
async def block_commit(ctx: CommandContext, args: Args) -> None:
    """cf. qmp_block_commit."""
    daemon = ctx.daemon
    graph = daemon.graph
    device = args.get_str("device")
    try:
        bs = get_root_node(graph, device)
    except BlockMirrorError as e:
        if graph.find_backend(device) is None and graph.find_node(device) is None:
            raise DeviceNotFound(f"Device '{device}' not found") from e
        raise
    check_op(bs, "commit-source")
    top = bs
    top_node, top_name = args.opt_str("top-node"), c_string(args.opt_str("top"))
    found: BlockNode | None = top
    if top_node is not None and top_name is not None:
        raise BlockMirrorError("'top-node' and 'top' are mutually exclusive")
    if top_node is not None:
        found = _chain_node(graph, bs, top_node)
    elif top_name and bs.filename != top_name:
        found = find_backing_image(bs, top_name)
    if found is None:
        raise BlockMirrorError(f"Top image file {top_name or 'NULL'} not found")
    top = found
    base_node, base_name = args.opt_str("base-node"), c_string(args.opt_str("base"))
    base: BlockNode | None
    if base_node is not None and base_name is not None:
        raise BlockMirrorError("'base-node' and 'base' are mutually exclusive")
    if base_node is not None:
        base = _chain_node(graph, top, base_node)
    elif base_name:
        base = find_backing_image(top, base_name)
        if base is None:
            raise BlockMirrorError(f"Can't find '{base_name}' in the backing chain")
    else:
        base = find_base(top)
        if base is None:
            raise BlockMirrorError("There is no backimg image")
    stop = filter_or_cow(base)
    node: BlockNode | None = top
    while node is not None and node is not stop:
        check_op(node, "commit-target")
        node = filter_or_cow(node)
    if top is base:
        raise BlockMirrorError("cannot commit an image into itself")
    jobs = daemon.jobs
    job_id = args.opt_str("job-id")
    backing_file = c_string(args.opt_str("backing-file"))
    speed, on_error = args.get_int("speed"), args.get_str("on-error")
    filter_name = args.opt_str("filter-node-name")
    auto_finalize, auto_dismiss = args.get_bool("auto-finalize"), args.get_bool("auto-dismiss")
    top_perm, _shared = graph.cumulative_perms(top)
    is_active = top.skip_filters() is bs.skip_filters()
    if top_perm & Perm.WRITE or is_active:
        if backing_file is not None:
            raise BlockMirrorError("'backing-file' specified, but 'top' is the active layer"
                                   if is_active else
                                   "'backing-file' specified, but 'top' has a writer on it")
        await start_active_commit(
            jobs, job_id if job_id is not None else device_name(bs), top=top, base=base,
            speed=speed, on_error=on_error, filter_node_name=filter_name,
            auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        return
    overlay = find_overlay(bs, top)
    if overlay is not None:
        check_op(overlay, "commit-target")
    await start_commit(
        jobs, job_id if job_id is not None else device_name(bs), active=bs, top=top,
        base=base, speed=speed, on_error=on_error, backing_file=backing_file,
        filter_node_name=filter_name, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)


@command("block-stream")
async def block_stream(ctx: CommandContext, args: Args) -> None:
    """cf. qmp_block_stream."""
    graph = ctx.daemon.graph
    base_name, base_node = c_string(args.opt_str("base")), args.opt_str("base-node")
    bottom_name = args.opt_str("bottom")
    if base_name is not None and base_node is not None:
        raise BlockMirrorError("'base' and 'base-node' cannot be specified at the same time")
    if base_name is not None and bottom_name is not None:
        raise BlockMirrorError("'base' and 'bottom' cannot be specified at the same time")
    if bottom_name is not None and base_node is not None:
        raise BlockMirrorError("'bottom' and 'base-node' cannot be specified at the same time")
    device = args.get_str("device")
    bs = graph.lookup(device, device)
    base: BlockNode | None = None
    bottom: BlockNode | None = None
    if base_name is not None:
        base = find_backing_image(bs, base_name)
        if base is None:
            raise BlockMirrorError(f"Can't find '{base_name}' in the backing chain")
    if base_node is not None:
        base = _lookup_node(graph, base_node)
        if bs is base or not chain_contains(bs, base):
            raise BlockMirrorError(f"Node '{base_node}' is not a backing image of '{device}'")
    if bottom_name is not None:
        bottom = _lookup_node(graph, bottom_name)
        if bottom.driver.is_filter:
            raise BlockMirrorError(f"Node '{bottom_name}' is a filter, use a non-filter node "
                                   "as 'bottom'")
        if not chain_contains(bs, bottom):
            raise BlockMirrorError(f"Node '{bottom_name}' is not in a chain starting from "
                                   f"'{device}'")
    end = filter_or_cow(bottom) if bottom is not None else base
    node: BlockNode | None = bs
    while node is not None and node is not end:
        check_op(node, "stream")
        node = filter_or_cow(node)
    backing_file = c_string(args.opt_str("backing-file"))
    if base is None and backing_file is not None:
        raise BlockMirrorError("backing file specified, but streaming the entire chain")
    await start_stream(
        ctx.daemon.jobs, args.opt_str("job-id"), top=bs, base=base, bottom=bottom,
        speed=args.get_int("speed"), on_error=args.get_str("on-error"),
        backing_file=backing_file, filter_node_name=args.opt_str("filter-node-name"),
        auto_finalize=args.get_bool("auto-finalize"),
        auto_dismiss=args.get_bool("auto-dismiss"), default_id=device_name(bs))
