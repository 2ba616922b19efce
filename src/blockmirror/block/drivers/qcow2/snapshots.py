"""The snapshot table (cf. QEMU's qcow2-snapshot.c): read far enough to know which clusters
snapshots hold (their L1 tables), so that the active image never overwrites them in place.

Snapshots are preserved, not created, applied or deleted here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from blockmirror.block.drivers.qcow2.header import Header
from blockmirror.block.drivers.qcow2.image_file import ImageFile
from blockmirror.block.drivers.qcow2.layout import MAX_L1_BYTES
from blockmirror.errors import ImageFormatError

#: the fixed part of a snapshot table entry: l1_table_offset, l1_size, id_str_size,
#: name_size, date_sec, date_nsec, vm_clock_nsec, vm_state_size, extra_data_size
_ENTRY_HEADER = struct.Struct(">QIHHIIQII")


@dataclass
class SnapshotTable:
    """Where the internal snapshots' L1 tables are, and how long the table is."""

    #: (offset, entries) of each snapshot's L1 table
    l1_tables: list[tuple[int, int]] = field(default_factory=list)
    #: bytes the table spans from the header's snapshots_offset
    length: int = 0


async def read_snapshot_table(
    header: Header, image_file: ImageFile, cluster_size: int
) -> SnapshotTable:
    table = SnapshotTable()
    if not header.nb_snapshots:
        return table
    pos = header.snapshots_offset
    for _ in range(header.nb_snapshots):
        if pos + _ENTRY_HEADER.size > image_file.length:
            raise ImageFormatError("Snapshot table offset invalid")
        raw = await image_file.read(pos, _ENTRY_HEADER.size)
        l1_offset, l1_size, id_size, name_size, _s, _ns, _clock, _vm, extra = (
            _ENTRY_HEADER.unpack(raw)
        )
        pos += _ENTRY_HEADER.size + extra + id_size + name_size
        pos = (pos + 7) & ~7
        if l1_size > MAX_L1_BYTES // 8:
            raise ImageFormatError("Snapshot L1 table too large")
        if l1_offset % cluster_size or l1_offset + l1_size * 8 > image_file.length:
            raise ImageFormatError("Snapshot L1 table offset invalid")
        table.l1_tables.append((l1_offset, l1_size))
    table.length = pos - header.snapshots_offset
    return table
