"""Read-only views of nodes: QEMU's ImageInfo/BlockDeviceInfo dicts.

Used by the QMP query commands and ``blockmirror info``/``map``. Block status over a backing
chain is ``block/chain.py``'s.
"""

from __future__ import annotations

import math
import os
from typing import Any

from blockmirror.block import threadio
from blockmirror.block.graph import BlockGraph
from blockmirror.block.node import BlockNode

#: drivers that implement bdrv_get_info in QEMU (ImageInfo then carries dirty-flag)
_HAS_GET_INFO = frozenset({"file", "host_device", "raw", "qcow2", "rbd"})
#: protocol drivers without an allocated-size query (ImageInfo then has no actual-size)
_NO_ALLOCATED_SIZE = frozenset({"blkdebug", "nbd"})
_QDICT_BUCKETS = 512


def _tdb_hash(key: str) -> int:
    """The string hash QEMU's QDict buckets keys with (a TDB-style multiplicative hash)."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, c in enumerate(data):
        value = (value + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qemu_key_order(obj: Any) -> Any:
    """Reorder dict members (recursively) the way QEMU's QDict iterates them: by hash bucket,
    and newest first within a bucket. QEMU prints JSON in this order, e.g. in ``json:``
    filenames, so matching it makes our strings identical to QEMU's."""
    if isinstance(obj, dict):
        items = list(obj.items())
        order = sorted(range(len(items)),
                       key=lambda i: (_tdb_hash(items[i][0]) % _QDICT_BUCKETS, -i))
        return {items[i][0]: qemu_key_order(items[i][1]) for i in order}
    if isinstance(obj, list):
        return [qemu_key_order(v) for v in obj]
    return obj


def qemu_json(obj: Any) -> str:
    """JSON text as QEMU's qobject_to_json prints it (compact, QDict member order)."""
    import json  # here: few daemons ever need it, and every start would pay (issue 10)

    return json.dumps(qemu_key_order(obj))


def _has_get_info(node: BlockNode) -> bool:
    """cf. bdrv_get_info: filters without their own answer ask the node they filter."""
    if node.format_name in _HAS_GET_INFO:
        return True
    inner = node.filtered_child()
    return inner is not None and _has_get_info(inner)


def size_to_str(n: int) -> str:
    """cf. size_to_str (util/cutils.c): three significant digits and a binary unit."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _, exp = math.frexp(n / (1000.0 / 1024.0)) if n else (0.0, 0)
    i = max(0, (exp - 1) // 10)
    i = min(i, len(suffixes) - 1)
    return f"{n / (1 << (i * 10)):0.3g} {suffixes[i]}B"


def node_dirname(node: BlockNode) -> str | None:
    """cf. bdrv_dirname: the directory of the file below the node (through formats and
    filters), against which relative backing file names resolve; None when there is none."""
    cur: BlockNode | None = node
    while cur is not None:
        if cur.format_name in ("file", "host_device"):
            return os.path.dirname(cur.filename)
        cur = cur.file or cur.child("image") or cur.filtered_child()
    if node.filename and ":" not in node.filename.split("/")[0]:
        return os.path.dirname(node.filename)
    return None


async def allocated_size(node: BlockNode) -> int | None:
    """Bytes the node occupies on the host (cf. bdrv_get_allocated_file_size)."""
    drv = node.driver
    fd = getattr(drv, "fd", None)
    if node.format_name in ("file", "host_device") and isinstance(fd, int) and fd >= 0:
        st = await threadio.fstat(fd)
        return int(st.st_blocks) * 512
    if node.format_name in ("null-co", "null-aio"):
        return 0
    if node.format_name in _NO_ALLOCATED_SIZE:
        return None
    child = node.file or node.child("image")
    if child is None:
        return None
    return await allocated_size(child)


def backing_depth(node: BlockNode) -> int:
    """cf. bdrv_get_backing_file_depth: attached backing layers below the node."""
    return len(node.backing_chain()) - 1


def _filter_or_cow(node: BlockNode) -> BlockNode | None:
    """cf. bdrv_filter_or_cow_bs: a format's backing, or the child a filter passes to."""
    if node.backing is not None:
        return node.backing
    return node.filtered_child() if node.driver.is_filter else None


def _info_depth(node: BlockNode) -> int:
    """cf. bdrv_block_device_info's loop: filters count as layers too."""
    depth = 0
    seen = {id(node)}
    below = _filter_or_cow(node)
    while below is not None and id(below) not in seen:
        depth += 1
        seen.add(id(below))
        below = _filter_or_cow(below)
    return depth


def _format_specific(fmt: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    if not spec:
        return None
    if "type" in spec and "data" in spec:
        return spec
    return {"type": fmt, "data": spec}


async def image_info(node: BlockNode, *, backing_image: bool = True) -> dict[str, Any]:
    """QEMU's ImageInfo for a node (cf. bdrv_query_image_info), backing-image recursively."""
    info = node.info()
    out: dict[str, Any] = {
        "filename": node.filename,
        "format": node.format_name,
        "virtual-size": node.length(),
    }
    actual = await allocated_size(node)
    if actual is not None:
        out["actual-size"] = actual
    if info.cluster_size:
        out["cluster-size"] = info.cluster_size
    if _has_get_info(node):
        out["dirty-flag"] = info.dirty_flag
    if info.backing_filename:
        out["backing-filename"] = info.backing_filename
        backing = node.backing
        if backing is not None:
            out["full-backing-filename"] = backing.filename
        else:
            name = info.backing_filename
            directory = node_dirname(node)
            if os.path.isabs(name) or ":" in name.split("/")[0] or not directory:
                out["full-backing-filename"] = name
            else:
                out["full-backing-filename"] = os.path.join(directory, name)
        if info.backing_format:
            out["backing-filename-format"] = info.backing_format
    snapshots = getattr(node.driver, "snapshot_infos", None)
    if snapshots is not None:
        # cf. bdrv_query_snapshot_info_list: only when the image has some
        listed = await snapshots()
        if listed:
            out["snapshots"] = listed
    spec = _format_specific(node.format_name, info.format_specific)
    if spec is not None:
        out["format-specific"] = spec
    if backing_image and node.backing is not None:
        out["backing-image"] = await image_info(node.backing.skip_filters())
    elif backing_image and node.driver.is_filter and not node.implicit:
        below = node.filtered_child()
        if below is not None:
            out["backing-image"] = await image_info(below)
    return out


async def block_device_info(node: BlockNode, *, flat: bool = False) -> dict[str, Any]:
    """QEMU's BlockDeviceInfo (cf. bdrv_block_device_info), as QSD 7.2 fills it."""
    info = node.info()
    out: dict[str, Any] = {
        "file": node.filename,
        "node-name": node.name,
        "ro": node.read_only,
        "drv": node.format_name,
    }
    backing = node.backing
    if backing is not None and not node.driver.is_filter:
        # a filter's backing (mirror_top, commit_top) is no backing file (cf. bs->backing_file)
        out["backing_file"] = backing.filename
    elif info.backing_filename:
        out["backing_file"] = info.backing_filename
    out.update(
        {
            # cf. bdrv_block_device_info: flat output stops before counting the chain
            "backing_file_depth": 0 if flat else (
                _info_depth(node) if node.driver.is_filter else backing_depth(node)),
            "encrypted": False,
            "detect_zeroes": node.detect_zeroes,
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "cache": {
                "writeback": True,
                "direct": node.cache_direct,
                "no-flush": node.cache_no_flush,
            },
            # a uint64 in QEMU's BlockDriverState, an int (int64) in BlockDeviceInfo: QEMU
            # shows a threshold set with -1 (2^64-1) as -1
            "write_threshold": node.write_threshold - (1 << 64)
            if node.write_threshold >= 1 << 63 else node.write_threshold,
            "image": await image_info(node, backing_image=not flat),
        }
    )
    if len(node.bitmaps):
        out["dirty-bitmaps"] = node.bitmaps.info()
    return out


async def query_named_block_nodes(graph: BlockGraph, *, flat: bool = False) -> list[dict[str, Any]]:
    """query-named-block-nodes: newest node first, implicit filters hidden."""
    nodes = [n for n in graph.all_nodes() if not n.implicit]
    return [await block_device_info(n, flat=flat) for n in reversed(nodes)]


__all__ = [
    "allocated_size",
    "backing_depth",
    "block_device_info",
    "image_info",
    "node_dirname",
    "qemu_json",
    "qemu_key_order",
    "query_named_block_nodes",
    "size_to_str",
]
