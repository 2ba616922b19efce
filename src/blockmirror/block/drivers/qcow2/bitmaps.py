"""The qcow2 bitmaps extension (docs/interop/qcow2.txt, "Bitmaps extension").

Read for ``qemu-img info``: names, flags and granularities of the persistent bitmaps.
"""

from __future__ import annotations

import struct
from typing import Any

from blockmirror.block.drivers.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, Header
from blockmirror.block.drivers.qcow2.image_file import ImageFile


async def read_bitmap_list(header: Header, image_file: ImageFile) -> list[dict[str, Any]]:
    """Names, flags and granularities of persistent bitmaps, as qemu-img info lists them.

    The bitmaps count as consistent only while the bitmaps autoclear bit is set.
    """
    if not header.has_bitmaps_ext or not header.autoclear & AUTOCLEAR_BITMAPS:
        return []
    extension = next((d for t, d in header.other_extensions if t == EXT_BITMAPS), b"")
    if len(extension) < 24:
        return []
    count, _reserved, directory_size, directory_offset = struct.unpack_from(">IIQQ", extension)
    if directory_size > 64 * 1024 * 1024 or directory_offset + directory_size > image_file.length:
        return []
    raw = await image_file.read(directory_offset, directory_size)
    bitmaps: list[dict[str, Any]] = []
    pos = 0
    for _ in range(count):
        if pos + 24 > len(raw):
            break
        _table, _table_size, flags, _type, granularity_bits, name_size, extra = (
            struct.unpack_from(">QIIBBHI", raw, pos)
        )
        start = pos + 24 + extra
        name = raw[start : start + name_size].decode("utf-8", "replace")
        names = [word for bit, word in ((0, "in-use"), (1, "auto")) if flags & (1 << bit)]
        bitmaps.append({"flags": names, "name": name, "granularity": 1 << granularity_bits})
        pos = (start + name_size + 7) & ~7
    return bitmaps
