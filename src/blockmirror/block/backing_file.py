"""Rewriting the backing file name an image header records (change-backing-file;
cf. bdrv_change_backing_file and qcow2_change_backing_file).

Only the recorded name and format change; the graph's backing link stays as it is. For
qcow2, the header extensions on disk are kept byte for byte (whatever wrote them: bitmaps,
data file, feature table), the backing-format extension is replaced and moved first, as
qcow2_update_header orders it, and the name follows the end marker.
"""

from __future__ import annotations

import errno
import os
import struct

from blockmirror.block.drivers.qcow2.driver import Qcow2Driver
from blockmirror.block.node import BlockNode
from blockmirror.errors import BlockIOError, BlockMirrorError

_EXT_END = 0
_EXT_BACKING_FORMAT = 0xE2792ACA
_MAX_NAME = 1023


def _ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack(">II", ext_type, len(data)) + data + bytes((-len(data)) % 8)


def _extensions(buf: bytes, start: int, limit: int) -> list[tuple[int, bytes]]:
    out = []
    pos = start
    while pos + 8 <= limit:
        ext_type, ext_len = struct.unpack_from(">II", buf, pos)
        pos += 8
        if ext_type == _EXT_END:
            break
        out.append((ext_type, bytes(buf[pos : pos + ext_len])))
        pos += (ext_len + 7) & ~7
    return out


async def write_backing_file(node: BlockNode, backing_file: str, backing_fmt: str) -> None:
    """Record ``backing_file`` (and its format) in ``node``'s image header.

    Raises:
        BlockMirrorError: "Could not change backing file to '...': <strerror>".
    """
    try:
        await _write(node, backing_file, backing_fmt)
    except BlockIOError as e:
        raise BlockMirrorError(f"Could not change backing file to '{backing_file}': "
                               f"{os.strerror(e.errno)}") from e


async def _write(node: BlockNode, name: str, fmt: str) -> None:
    drv = node.driver
    if not isinstance(drv, Qcow2Driver) or node.file is None:
        raise BlockIOError(errno.ENOTSUP)
    h = drv.header
    file = node.file
    raw_name = name.encode()
    if len(raw_name) > _MAX_NAME:
        raise BlockIOError(errno.EINVAL)
    cs = h.cluster_size
    await node.drain()
    await node.flush()
    buf = await file.read(0, min(cs, file.length()))
    limit = h.backing_file_offset if h.backing_file_offset else len(buf)
    kept = [(t, d) for t, d in _extensions(buf, h.header_length, limit)
            if t != _EXT_BACKING_FORMAT]
    exts = b""
    if raw_name and fmt:
        exts += _ext(_EXT_BACKING_FORMAT, fmt.encode())
    exts += b"".join(_ext(t, d) for t, d in kept) + struct.pack(">II", _EXT_END, 0)
    offset = h.header_length + len(exts)
    if offset + len(raw_name) > cs:
        raise BlockIOError(errno.ENOSPC)
    await file.write(h.header_length, exts + raw_name)
    h.backing_file_offset = offset if raw_name else 0
    h.backing_file_size = len(raw_name)
    h.backing_file = name or None
    h.backing_format = fmt if raw_name and fmt else None
    await drv.image_file.write_header(h)
    await file.flush()


__all__ = ["write_backing_file"]
