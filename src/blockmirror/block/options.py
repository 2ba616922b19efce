"""Opening and closing nodes from BlockdevOptions (blockdev-add, --blockdev, -drive, drive-mirror).

``open_blockdev`` takes QMP's nested options (or keyval's dotted keys), opens the children first
(inline dicts become auto-named ``#blockNNN`` nodes, strings are references), then the driver,
then a qcow2's backing from its header; every link gets QEMU-like permissions so conflicting
users are refused. ``open_image`` is the filename path (probing, legacy ``blkdebug:`` and
``json:`` filenames); ``close_node``/``close_all``/``delete_blockdev`` undo it. Option and
filename syntax lives in ``block/optsyntax.py``. Drivers never open other nodes themselves;
this module is the only place that builds nodes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from blockmirror.block import drivers
from blockmirror.block.drivers.raw import PROBED_RAW_WARNING, RawDriver
from blockmirror.block.graph import BlockGraph, node_name_valid
from blockmirror.block.hostpath import host_path
from blockmirror.block.node import BlockBackend, BlockNode, Perm
from blockmirror.block.optsyntax import (
    child_keys,
    deep_merge,
    parse_filename,
    probe_format,
    probe_format_async,
    protocol_for,
    refresh_filename,
    unflatten,
)
from blockmirror.block.query import node_dirname
from blockmirror.errors import BlockMirrorError
from blockmirror.qapi import SchemaError, validate

log = logging.getLogger(__name__)

# options a parent passes down to children it opens inline (cf. bdrv_inherited_options)
_INHERITED = ("cache", "read-only", "auto-read-only", "discard", "force-share")

_STORAGE_SHARED = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


# --- validation --------------------------------------------------------------------------------


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate raw options (dotted keys, typed values or keyval strings) as BlockdevOptions.

    This is the block layer's single check of what it is asked to open, node by node as
    bdrv_open reads -drive options: the schema decides which members exist and converts
    strings the keyval way ("on", "y", "0x10", "010"), and a child given inline is checked as
    a node of its own (so texts name its members, not "file.x"). Two things are bdrv_open's
    own: a ``backing`` dict without a driver holds options for the backing the image header
    names (checked when that backing is opened), and ``discard`` also takes -drive's
    "on"/"off". The result keeps the caller's member order (it shows in json: filenames).

    Raises:
        BlockMirrorError: QEMU's text for the first problem.
    """
    tree = unflatten(options)
    driver = tree.get("driver")
    if isinstance(driver, str) and drivers.load(driver) is None:
        # QEMU has it, blockmirror does not: its options are not declared either
        raise BlockMirrorError(f"Parameter 'driver' does not accept value '{driver}'")
    _legacy_discard(tree)
    # "=name" members are internal (rbd's "=keyvalue-pairs" from an rbd: filename): as in
    # QEMU, the driver takes them before the schema sees the options
    internal = {k: tree.pop(k) for k in list(tree) if k.startswith("=")}
    children: dict[str, dict[str, Any]] = {}
    for role in child_keys(tree.get("driver")):
        ref = tree.get(role)
        if isinstance(ref, dict):
            children[role] = ref
            tree[role] = ""  # stands for the child while the node's own members are checked
    try:
        checked = validate("BlockdevOptions", tree, None, "", keyval="options")
    except SchemaError as e:
        raise BlockMirrorError(e.desc) from None
    out: dict[str, Any] = _in_order(tree, checked)
    for role, ref in children.items():
        out[role] = ref if role == "backing" and _is_overlay(ref) else check_options(ref)
    out.update(internal)
    return out


def _is_overlay(ref: Any) -> bool:
    return isinstance(ref, dict) and "driver" not in ref


def _legacy_discard(tree: dict[str, Any]) -> None:
    """cf. bdrv_parse_discard_flags: "off"/"on" are -drive's names of ignore/unmap.

    Inherited by inline children (cf. bdrv_inherited_options), so mapped before they see it.
    """
    value = tree.get("discard")
    if isinstance(value, str):
        if value not in ("off", "ignore", "on", "unmap"):
            raise BlockMirrorError("Invalid discard option")
        tree["discard"] = {"off": "ignore", "on": "unmap"}.get(value, value)


def _in_order(raw: Any, checked: Any) -> Any:
    """``checked`` with the dict members in ``raw``'s order."""
    if isinstance(raw, dict) and isinstance(checked, dict):
        return {k: _in_order(raw[k], checked[k]) for k in raw if k in checked}
    if isinstance(raw, list) and isinstance(checked, list):
        return [_in_order(r, c) for r, c in zip(raw, checked, strict=True)]
    return checked


# --- opening ---------------------------------------------------------------------------------


class _OpenCtx:
    """What one open call created, so a failure can close exactly that."""

    def __init__(self, graph: BlockGraph) -> None:
        self.graph = graph
        self.created: list[BlockNode] = []

    async def rollback(self) -> None:
        for node in reversed(self.created):
            if node.name in self.graph.nodes and not node.parents:
                try:
                    await close_node(self.graph, node, flush=False)
                except Exception:  # already failing; keep the first error
                    log.exception("closing %s after a failed open", node.name)


async def open_blockdev(
    graph: BlockGraph, options: Mapping[str, Any], *, monitor_owned: bool = True,
    validated: bool = False,
) -> BlockNode:
    """Open one node tree from BlockdevOptions; the root needs a node-name.

    ``validated``: the options already went through the schema (QMP blockdev-add,
    --blockdev); otherwise they are checked here (``check_options``).

    Raises:
        BlockMirrorError: QEMU's texts for bad options, missing files, conflicts.
    """
    opts = dict(options) if validated else unflatten(options)
    if "node-name" not in opts:
        raise BlockMirrorError("'node-name' must be specified for the root node")
    if not validated:
        opts = check_options(opts)
    ctx = _OpenCtx(graph)
    try:
        node = await _open_node(ctx, opts, parent=None, chain=())
    except BaseException:
        await ctx.rollback()
        raise
    if monitor_owned:
        graph.monitor_owned.add(node.name)
    return node


async def open_image(
    graph: BlockGraph,
    filename: str,
    fmt: str | None = None,
    *,
    read_only: bool,
    backing: bool = True,
    node_name: str | None = None,
    options: Mapping[str, Any] | None = None,
    monitor_owned: bool = False,
    warn: Callable[[str], None] | None = None,
) -> BlockNode:
    """Open an image by filename (drive-mirror targets, -drive, the CLI); probe when no fmt.

    A probed raw image restricts writes to sector 0 (QEMU's guard against a guest turning
    its disk into another format); ``warn`` receives QEMU's warning text about it.

    Raises:
        BlockMirrorError: as for open_blockdev.
    """
    opts: dict[str, Any] = dict(unflatten(options or {}))
    legacy = parse_filename(filename)
    probed = False
    base: dict[str, Any]
    if legacy is not None:
        image = legacy.get("image")
        if fmt is None and filename.startswith("blkdebug:") and isinstance(image, dict):
            # probing reads through the filter: the image file decides
            fmt = await probe_format_async(str(image.get("filename", "")))
            probed = True
        elif fmt is None and legacy.get("driver") == "rbd":
            # cf. bdrv_probe_all over the protocol: the image's first bytes decide (through
            # the driver registry: most daemons never import the rbd driver)
            rbd = drivers.load("rbd")
            if rbd is None:
                raise BlockMirrorError("Parameter 'driver' does not accept value 'rbd'")
            fmt = await rbd.probe_image_format(legacy, graph)
            probed = True
        if fmt is not None and fmt != legacy.get("driver"):
            legacy = {"driver": fmt, "file": legacy}
        base = legacy
    else:
        if fmt is None:
            fmt = await probe_format_async(filename)
            probed = True
        if fmt in ("file", "host_device"):
            base = {"driver": fmt, "filename": filename}
        else:
            base = {"driver": fmt, "file": {"driver": protocol_for(filename),
                                            "filename": filename}}
    deep_merge(base, opts)
    base["read-only"] = read_only
    if not backing and base.get("driver") == "qcow2":
        base["backing"] = None
    if node_name is not None:
        base["node-name"] = node_name
    base = check_options(base)
    ctx = _OpenCtx(graph)
    try:
        node = await _open_node(ctx, base, parent=None, chain=())
    except BaseException:
        await ctx.rollback()
        raise
    if probed and node.format_name == "raw":
        assert isinstance(node.driver, RawDriver)
        node.driver.probed = True
        if warn is not None and not node.read_only:
            warn(PROBED_RAW_WARNING.format(filename))
    if monitor_owned:
        graph.monitor_owned.add(node.name)
    return node


def _real(path: str) -> str:
    return os.path.realpath(host_path(path))


async def _open_node(
    ctx: _OpenCtx,
    opts: dict[str, Any],
    *,
    parent: Mapping[str, Any] | None,
    chain: tuple[str, ...],
) -> BlockNode:
    """Open one node from checked options (``check_options``)."""
    graph = ctx.graph
    opts = dict(opts)
    if parent is not None:
        for key in _INHERITED:
            if key not in opts and key in parent:
                opts[key] = parent[key]
    driver: str = opts["driver"]
    cls = drivers.load(driver)
    if cls is None:  # a QEMU driver blockmirror does not implement
        raise BlockMirrorError(f"Parameter 'driver' does not accept value '{driver}'")

    name = opts.get("node-name")
    if name is None:
        name = graph.new_auto_name()
    elif not node_name_valid(name):
        raise BlockMirrorError(f"Invalid node-name: '{name}'")
    if name in graph.nodes:
        raise BlockMirrorError(f"Duplicate nodes with node-name='{name}'")

    discard_unmap = opts.get("discard", "ignore") == "unmap"
    detect = opts.get("detect-zeroes", "off")
    if detect == "unmap" and not discard_unmap:
        raise BlockMirrorError(
            "setting detect-zeroes to unmap is not allowed without setting discard "
            "operation to unmap"
        )
    cache = opts.get("cache", {})
    read_only = bool(opts.get("read-only", False))
    force_share = bool(opts.get("force-share", False))
    if force_share and not read_only:
        raise BlockMirrorError("force-share=on can only be used with read-only images")

    own = {k: v for k, v in opts.items() if k not in child_keys(driver)}
    node = BlockNode(
        name=name,
        options=own,
        read_only=read_only,
        discard_unmap=discard_unmap,
        detect_zeroes=detect,
        cache_direct=bool(cache.get("direct", False)),
        cache_no_flush=bool(cache.get("no-flush", False)),
    )
    node.driver = cls(node)

    # files this node opens (not counting its backing): if one is already further up the
    # backing chain being opened, the chain loops
    for my_file in _files_of(graph, opts):
        if _real(my_file) in chain:
            raise BlockMirrorError(f"Backing file '{my_file}' creates an infinite loop.")
    below = (*chain, *(_real(f) for f in _files_of(graph, opts)))

    try:
        await _open_children_and_driver(ctx, node, opts, own, chain, below, force_share)
    except BaseException:
        # unlink whatever this node took, so the rollback sees orphans (and references stay
        # untouched); a node registered in the graph is closed by the rollback itself
        if node.name not in graph.nodes or graph.nodes[node.name] is not node:
            for link in list(node.children.values()):
                graph.detach(link)
        raise
    return node


async def _open_children_and_driver(
    ctx: _OpenCtx,
    node: BlockNode,
    opts: dict[str, Any],
    own: dict[str, Any],
    chain: tuple[str, ...],
    below: tuple[str, ...],
    force_share: bool,
) -> None:
    graph = ctx.graph
    cls = type(node.driver)
    # children other than backing exist before the driver opens (it reads headers through them)
    for role in child_keys(opts.get("driver")):
        if role == "backing" or role not in opts:
            continue
        child = await _child(ctx, opts[role], opts, chain)
        if child is not None:
            if _passes_through(node, role):
                # cf. bdrv_filter_default_perms: the child serves exactly our users
                graph.attach(
                    node, child, role, Perm.NONE, Perm.all(), passthrough=True,
                    take=_perm_from_names(node.options.get("take-child-perms")),
                    unshare=Perm.NONE if force_share else _perm_from_names(
                        node.options.get("unshare-child-perms")),
                )
            else:
                perm, shared = _child_perms(node, role, force_share)
                graph.attach(node, child, role, perm, shared)
            # options show children by node name, as query-named-block-nodes does
            own[role] = child.name

    # registered after its file/image children and before its backing, as QEMU names them
    # (queries list nodes newest first)
    graph.add_node(node)
    ctx.created.append(node)
    await node.driver.open()
    if not node.filename:
        # drivers with a filename syntax of their own (nbd URIs) set it in open()
        node.filename = refresh_filename(node)

    if _supports_backing(cls.format_name):
        await _open_backing(ctx, node, opts, below)


def _files_of(graph: BlockGraph, opts: Mapping[str, Any]) -> list[str]:
    """Host files a node's options open (itself and its non-backing children), for loops."""
    if opts.get("driver") in ("file", "host_device"):
        f = opts.get("filename")
        return [f] if isinstance(f, str) else []
    out: list[str] = []
    for role in child_keys(opts.get("driver")):
        if role == "backing":
            continue
        ref = opts.get(role)
        if isinstance(ref, dict):
            out += _files_of(graph, ref)
        elif isinstance(ref, str) and (node := graph.find_node(ref)) is not None:
            base = node.skip_filters()
            proto = base if base.file is None else base.file
            if proto.format_name in ("file", "host_device"):
                out.append(proto.filename)
    return out


def _supports_backing(driver: str) -> bool:
    return driver == "qcow2"


async def _child(
    ctx: _OpenCtx, ref: Any, parent: Mapping[str, Any], chain: tuple[str, ...]
) -> BlockNode | None:
    if ref is None:
        return None
    if isinstance(ref, str):
        found = ctx.graph.find_node(ref)
        if found is None:
            legacy = parse_filename(ref)
            if legacy is None:
                raise BlockMirrorError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            return await _open_node(ctx, check_options(legacy), parent=parent, chain=chain)
        return found
    if isinstance(ref, dict):
        return await _open_node(ctx, ref, parent=parent, chain=chain)
    raise BlockMirrorError("Invalid parameter type for 'file', expected: object")


def _passes_through(node: BlockNode, role: str) -> bool:
    """Filters (blkdebug) and raw hand their users' permissions on to the child."""
    return role != "backing" and (node.driver.is_filter or node.format_name == "raw")


def _child_perms(node: BlockNode, role: str, force_share: bool) -> tuple[Perm, Perm]:
    """cf. bdrv_default_perms: what a format takes on its storage or backing, and shares."""
    writable = not node.read_only
    if role == "backing":
        perm, shared = Perm.CONSISTENT_READ, Perm.all()
    else:
        # storage: metadata must stay consistent, nobody else may write or resize it
        perm = Perm.CONSISTENT_READ
        if writable:
            perm |= Perm.WRITE | Perm.RESIZE
        shared = _STORAGE_SHARED
    if force_share:
        shared = Perm.all()
    return perm, shared


_PERM_NAMES = {
    "consistent-read": Perm.CONSISTENT_READ,
    "write": Perm.WRITE,
    "write-unchanged": Perm.WRITE_UNCHANGED,
    "resize": Perm.RESIZE,
}


def _perm_from_names(names: list[str] | None) -> Perm:
    out = Perm.NONE
    for n in names or []:
        out |= _PERM_NAMES[n]
    return out


async def _open_backing(
    ctx: _OpenCtx, node: BlockNode, opts: Mapping[str, Any], chain: tuple[str, ...]
) -> None:
    overlay: dict[str, Any] = {}
    ref = opts.get("backing")
    if isinstance(ref, dict) and "driver" not in ref:
        # e.g. -drive ...,backing.node-name=base: options for the backing the header names
        overlay = dict(ref)
    if "backing" in opts and not overlay:
        if ref is None:
            node.options["backing"] = None
            return
        if isinstance(ref, dict):
            ref = {**ref, "read-only": ref.get("read-only", True)}
        try:
            child = await _child(ctx, ref, {}, chain)
        except BlockMirrorError as e:
            raise BlockMirrorError(f"Could not open backing file: {e}") from e
    else:
        info = node.info()
        if not info.backing_filename:
            return
        fname = info.backing_filename
        legacy = parse_filename(fname)
        if legacy is None:
            path = fname
            base_dir = node_dirname(node)
            if not os.path.isabs(path) and base_dir is not None:
                path = os.path.join(base_dir, path)
            if _real(path) in chain:
                raise BlockMirrorError(
                    f"Could not open backing file: Backing file '{fname}' creates an "
                    "infinite loop."
                )
            fmt = info.backing_format or await probe_format_async(path)
            bopts: dict[str, Any] = {
                "driver": fmt, "file": {"driver": protocol_for(path), "filename": path}}
        elif info.backing_format and legacy.get("driver") != info.backing_format:
            # e.g. backing_file=blkdebug:conf:img with backing_fmt=raw: raw over blkdebug
            bopts = {"driver": info.backing_format, "file": legacy}
        else:
            bopts = legacy
        bopts["read-only"] = True
        for key in ("cache", "force-share"):
            if key in node.options:
                bopts[key] = node.options[key]
        deep_merge(bopts, overlay)
        try:
            child = await _open_node(ctx, check_options(bopts), parent=None, chain=chain)
        except BlockMirrorError as e:
            raise BlockMirrorError(f"Could not open backing file: {e}") from e
    if child is None:
        return
    perm, shared = _child_perms(node, "backing", False)
    ctx.graph.attach(node, child, "backing", perm, shared)
    if isinstance(opts.get("backing"), str):
        node.options["backing"] = child.name


async def open_backing_file(graph: BlockGraph, node: BlockNode) -> BlockNode | None:
    """Open and attach the backing file named in ``node``'s header (cf. bdrv_open_backing_file).

    Used on an image opened without its backing (drive-mirror's target, mode=existing). The
    backing is opened read-only with the node's cache and force-share options; a node that
    names no backing file keeps none. Returns the new backing node, or None.

    Raises:
        BlockMirrorError: "Could not open backing file: ..." (nothing opened stays behind).
    """
    ctx = _OpenCtx(graph)
    try:
        await _open_backing(ctx, node, {}, ())
    except BaseException:
        await ctx.rollback()
        raise
    link = node.children.get("backing")
    return link.node if link is not None else None


def attach_backend(
    graph: BlockGraph,
    node: BlockNode,
    *,
    name: str = "",
    owner: str = "",
    write: bool = False,
    no_share: bool = False,
) -> BlockBackend:
    """A root user of ``node`` with blk_new_open's permissions (what qemu-img/qemu-io take):
    consistent read (+ write and resize when writing), sharing everything unless
    ``no_share`` (BDRV_O_NO_SHARE: others may then only read).

    Raises:
        BlockMirrorError: the node (or a file below it) is locked or used incompatibly.
    """
    perm = Perm.CONSISTENT_READ | (Perm.WRITE | Perm.RESIZE if write else Perm.NONE)
    shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED if no_share else Perm.all()
    blk = BlockBackend(name, owner or (f"block device '{name}'" if name else "a user"), perm,
                       shared)
    graph.attach(blk, node, "root", perm, shared)
    graph.add_backend(blk)
    return blk


# --- closing ---------------------------------------------------------------------------------


async def close_node(graph: BlockGraph, node: BlockNode, *, flush: bool = True) -> None:
    """Flush and close a node nobody uses any more, then children left without users.

    Raises:
        BlockMirrorError: if the node still has parents.
    """
    if node.parents:
        raise BlockMirrorError(f"Node {node.name} is in use")
    graph.forget_node(node)
    if flush and not node.read_only:
        try:
            await node.drain()
            await node.flush()
        except BlockMirrorError as e:
            log.warning("flushing %s on close failed: %s", node.name, e)
    try:
        await node.driver.close()
    finally:
        children = [link.node for link in node.children.values()]
        for link in list(node.children.values()):
            graph.detach(link)
        for child in children:
            if child.name in graph.nodes and graph.refcount(child) == 0:
                await close_node(graph, child, flush=flush)


async def unref_node(graph: BlockGraph, node: BlockNode) -> None:
    """Close ``node`` if nothing (parent, backend, monitor) references it any more."""
    if node.name in graph.nodes and graph.refcount(node) == 0:
        await close_node(graph, node)


async def close_all(graph: BlockGraph) -> None:
    """Close every node, users first (Daemon.shutdown)."""
    for blk in list(graph.backends):
        graph.remove_backend(blk)
    graph.monitor_owned.clear()
    while graph.nodes:
        roots = [n for n in graph.all_nodes() if not n.parents]
        if not roots:
            # only cycles are left (never built by us): cut them
            for n in graph.all_nodes():
                for link in list(n.parents):
                    graph.detach(link)
            continue
        for n in roots:
            if n.name in graph.nodes:
                try:
                    await close_node(graph, n)
                except Exception:
                    log.exception("closing node %s", n.name)
                    graph.forget_node(n)


async def delete_blockdev(graph: BlockGraph, name: str) -> None:
    """blockdev-del: checks and texts of qmp_blockdev_del, in QEMU's order.

    Raises:
        BlockMirrorError: Failed to find node / in use / busy / not owned by the monitor.
    """
    node = graph.find_node(name)
    if node is None:
        raise BlockMirrorError(f"Failed to find node with node-name='{name}'")
    if any(isinstance(c.parent, BlockBackend) for c in node.parents):
        raise BlockMirrorError(f"Node {name} is in use")
    for op in ("drive_del", "all"):
        reasons = node.blockers.get(op)
        if reasons:
            raise BlockMirrorError(f"Node '{name}' is busy: {reasons[0]}")
    if node.blockers:
        reasons = next(iter(node.blockers.values()))
        raise BlockMirrorError(f"Node '{name}' is busy: {reasons[0]}")
    if name not in graph.monitor_owned:
        raise BlockMirrorError(f"Node {name} is not owned by the monitor")
    if graph.refcount(node) > 1:
        raise BlockMirrorError(f"Block device {name} is in use")
    graph.monitor_owned.discard(name)
    await close_node(graph, node)


__all__ = [
    "attach_backend",
    "check_options",
    "close_all",
    "close_node",
    "delete_blockdev",
    "open_backing_file",
    "open_blockdev",
    "open_image",
    "parse_filename",
    "probe_format",
    "probe_format_async",
    "protocol_for",
    "unflatten",
    "unref_node",
]
