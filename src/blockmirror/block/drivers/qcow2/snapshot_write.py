"""Creating and deleting internal snapshots of an open qcow2 image (cf. qcow2-snapshot.c's
qcow2_snapshot_create / qcow2_snapshot_delete and qcow2_update_snapshot_refcount).

A snapshot is an entry of the snapshot table that points at a copy of the L1 table; every
cluster the copy reaches (L2 tables, data clusters) holds one more reference, so the active
image copies a shared cluster before changing it (the COPIED flag, bit 63 of L1 and L2
entries, says "refcount is exactly one": write in place).

Both operations run under the driver's metadata lock, with guest writes held by the caller,
and in an order that leaves at worst leaked clusters after a crash:

* create: flush; allocate the L1 copy and write it; raise the refcounts and clear the COPIED
  flags of the active tables; flush (refcounts, then L2, then L1); write a new snapshot table,
  then the header that points at it; free the old table;
* delete: flush; write the table without the entry, then the header; drop the references the
  snapshot held; flush; set COPIED again where a refcount fell back to one; flush.

Entries are kept byte for byte (extra data included) when the table is rewritten, so
snapshots written by QEMU survive ours. The table format is docs/interop/qcow2.txt's.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import MutableSequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blockmirror.block.drivers.qcow2 import compress
from blockmirror.block.drivers.qcow2.cluster_map import decode_l2
from blockmirror.block.drivers.qcow2.header import MAX_SNAPSHOTS
from blockmirror.block.drivers.qcow2.layout import (
    COMPRESSED,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    NORMAL,
    OFLAG_COPIED,
    ZERO_ALLOC,
    ceil_div,
    cluster_type,
)
from blockmirror.block.drivers.qcow2.snapshots import read_snapshot_table
from blockmirror.errors import BlockIOError, ImageFormatError

if TYPE_CHECKING:
    from blockmirror.block.drivers.qcow2.driver import Qcow2Driver

#: l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec, vm_clock_nsec,
#: vm_state_size, extra_data_size
_ENTRY = struct.Struct(">QIHHIIQII")
#: the extra data QEMU 7.2 writes: vm_state_size_large, disk_size, icount
_EXTRA = struct.Struct(">QQQ")
NO_ICOUNT = (1 << 64) - 1


@dataclass
class SnapshotEntry:
    """One entry of the snapshot table (cf. QCowSnapshot)."""

    l1_table_offset: int
    l1_size: int
    id_str: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra: bytes

    @property
    def icount(self) -> int | None:
        if len(self.extra) < _EXTRA.size:
            return None
        value = _EXTRA.unpack_from(self.extra)[2]
        return None if value == NO_ICOUNT else value

    def encode(self) -> bytes:
        ident, name = self.id_str.encode(), self.name.encode("utf-8", "surrogateescape")
        out = _ENTRY.pack(self.l1_table_offset, self.l1_size, len(ident), len(name),
                          self.date_sec, self.date_nsec, self.vm_clock_nsec,
                          self.vm_state_size, len(self.extra)) + self.extra + ident + name
        return out + bytes(-len(out) % 8)

    def info(self) -> dict[str, int | str]:
        """QEMU's SnapshotInfo."""
        # a name cut inside a character shows the replacement character, as in QEMU's JSON
        name = self.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        out: dict[str, int | str] = {
            "id": self.id_str, "name": name, "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec, "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        icount = self.icount
        if icount is not None:
            out["icount"] = icount
        return out


def parse_entries(raw: bytes, count: int) -> list[SnapshotEntry]:
    """The entries of a snapshot table read from its start (cf. qcow2_read_snapshots)."""
    entries: list[SnapshotEntry] = []
    pos = 0
    for _ in range(count):
        if pos + _ENTRY.size > len(raw):
            raise ImageFormatError("Snapshot table offset invalid")
        (l1_off, l1_size, id_size, name_size, sec, nsec, clock, vm_size,
         extra_size) = _ENTRY.unpack_from(raw, pos)
        pos += _ENTRY.size
        end = pos + extra_size + id_size + name_size
        if end > len(raw):
            raise ImageFormatError("Snapshot table offset invalid")
        extra = raw[pos:pos + extra_size]
        pos += extra_size
        ident = raw[pos:pos + id_size].decode("utf-8", "replace")
        pos += id_size
        name = raw[pos:pos + name_size].decode("utf-8", "surrogateescape")
        pos = (end + 7) & ~7
        entries.append(SnapshotEntry(l1_off, l1_size, ident, name, sec, nsec, clock, vm_size,
                                     bytes(extra)))
    return entries


def encode_table(entries: list[SnapshotEntry]) -> bytes:
    return b"".join(e.encode() for e in entries)


#: cf. QEMUSnapshotInfo.name (char[256]): a longer name is cut to 255 bytes when stored
MAX_NAME_BYTES = 255


def stored_name(name: str) -> str:
    """The name as QEMU stores it (pstrcpy into 256 bytes), possibly cut inside a character."""
    return name.encode()[:MAX_NAME_BYTES].decode("utf-8", "surrogateescape")


def new_id(entries: list[SnapshotEntry]) -> str:
    """cf. find_new_snapshot_id: one more than the largest numeric id."""
    top = 0
    for e in entries:
        try:
            top = max(top, int(e.id_str))
        except ValueError:
            continue
    return str(top + 1)


def find(entries: list[SnapshotEntry], snap_id: str | None, name: str | None) -> int | None:
    """cf. bdrv_snapshot_find_by_id_and_name: both given must both match."""
    for i, e in enumerate(entries):
        if snap_id is not None and e.id_str != snap_id:
            continue
        if name is not None and e.name != name:
            continue
        if snap_id is None and name is None:
            continue
        return i
    return None


async def read_entries(drv: Qcow2Driver) -> list[SnapshotEntry]:
    header = drv.header
    if not header.nb_snapshots:
        return []
    raw = await drv.image_file.read(header.snapshots_offset, drv.snapshots.length)
    return parse_entries(raw, header.nb_snapshots)


# --- refcounts ---------------------------------------------------------------------------------


async def _l2_table(drv: Qcow2Driver, offset: int, l1_index: int,
                    active: bool) -> MutableSequence[int]:
    cm = drv.cluster_map
    if active:
        return await cm.load_l2(offset, l1_index)
    cached = cm.l2_cache.get(offset)
    if cached is not None:
        return cached
    raw = await drv.image_file.read(offset, drv.geometry.cluster_size)
    return decode_l2(raw)


def _references(drv: Qcow2Driver, table: MutableSequence[int]) -> list[int]:
    """The host clusters an L2 table's entries hold a reference on."""
    bits, version = drv.geometry.cluster_bits, drv.header.version
    out: list[int] = []
    for entry in table:
        kind = cluster_type(entry, version)
        if kind in (NORMAL, ZERO_ALLOC):
            out.append((entry & L2E_OFFSET_MASK) >> bits)
        elif kind == COMPRESSED:
            out.extend(compress.host_clusters(entry, bits))
    return out


async def _add_references(drv: Qcow2Driver, l1: list[int]) -> None:
    """One more reference on everything ``l1`` reaches (the active table, for a new snapshot)."""
    al, bits = drv.allocator, drv.geometry.cluster_bits
    for index, l1_entry in enumerate(l1):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        table = await _l2_table(drv, l2_offset, index, True)
        for cluster in _references(drv, table):
            await al.add(cluster, 1)
        await al.add(l2_offset >> bits, 1)


async def _snapshot_references(drv: Qcow2Driver, entry: SnapshotEntry) -> list[int]:
    """Every reference a snapshot holds: its L2 tables, what they map, its L1 table."""
    geo = drv.geometry
    active_l2 = {e & L1E_OFFSET_MASK for e in drv.cluster_map.l1}
    raw = await drv.image_file.read(entry.l1_table_offset, entry.l1_size * 8)
    refs: list[int] = []
    for index, l1_entry in enumerate(struct.unpack(f">{entry.l1_size}Q", raw)):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        table = await _l2_table(drv, l2_offset, index, False)
        refs.extend(_references(drv, table))
        refs.append(l2_offset >> geo.cluster_bits)
        if l2_offset not in active_l2:
            drv.cluster_map.l2_cache.drop(l2_offset)  # clean (flushed): safe to forget
    if entry.l1_size:
        refs.extend(geo.clusters(entry.l1_table_offset, entry.l1_size * 8))
    return refs


async def _update_copied(drv: Qcow2Driver) -> None:
    """cf. qcow2_update_snapshot_refcount(..., 0): COPIED exactly where the refcount is 1."""
    cm, al = drv.cluster_map, drv.allocator
    bits, version = drv.geometry.cluster_bits, drv.header.version
    for index, l1_entry in enumerate(cm.l1):
        l2_offset = l1_entry & L1E_OFFSET_MASK
        if not l2_offset:
            continue
        table = await cm.load_l2(l2_offset, index)
        changed = False
        for i, entry in enumerate(table):
            if cluster_type(entry, version) not in (NORMAL, ZERO_ALLOC):
                continue
            rc = await al.refcount((entry & L2E_OFFSET_MASK) >> bits)
            new = entry | OFLAG_COPIED if rc == 1 else entry & ~OFLAG_COPIED
            if new != entry:
                table[i] = new
                changed = True
        if changed:
            cm.l2_cache.mark_dirty(l2_offset, table)
        rc = await al.refcount(l2_offset >> bits)
        new_l1 = l2_offset | OFLAG_COPIED if rc == 1 else l2_offset
        if new_l1 != l1_entry:
            cm.l1[index] = new_l1
            cm.l1_dirty.add(index)


# --- the snapshot table ------------------------------------------------------------------------


async def _write_table(drv: Qcow2Driver, entries: list[SnapshotEntry]) -> None:
    """cf. qcow2_write_snapshots: a new table, then the header, then the old table freed."""
    header, al, image_file = drv.header, drv.allocator, drv.image_file
    geo = drv.geometry
    old_offset, old_length = header.snapshots_offset, drv.snapshots.length
    data = encode_table(entries)
    offset = 0
    if entries:
        count = ceil_div(len(data), geo.cluster_size)
        first = await al.allocate(count)
        al.metadata_clusters.update(range(first, first + count))
        offset = first << geo.cluster_bits
        await drv._flush_locked()  # the table's refcounts are durable first
        await image_file.write(offset, data)
        await image_file.flush()
    header.nb_snapshots = len(entries)
    header.snapshots_offset = offset
    await image_file.write_header(header)
    await image_file.flush()
    if old_offset and old_length:
        al.free_later(geo.clusters(old_offset, old_length))
    drv.snapshots = await read_snapshot_table(header, image_file, geo.cluster_size)


# --- the operations ----------------------------------------------------------------------------


async def create_snapshot(drv: Qcow2Driver, name: str, date_sec: int, date_nsec: int,
                          vm_clock_nsec: int) -> SnapshotEntry:
    """Add a snapshot of the image as it is now (guest writes must be held by the caller).

    Raises:
        BlockIOError: too many snapshots (EFBIG), or an I/O error (the image stays usable).
    """
    async with drv.lock:
        drv.corruption.check_usable()
        await drv._flush_locked()
        entries = await read_entries(drv)
        if len(entries) >= MAX_SNAPSHOTS:
            raise BlockIOError(errno.EFBIG)
        geo, al, cm = drv.geometry, drv.allocator, drv.cluster_map
        l1 = list(cm.l1)
        l1_offset = 0
        if l1:
            count = ceil_div(len(l1) * 8, geo.cluster_size)
            first = await al.allocate(count)
            al.metadata_clusters.update(range(first, first + count))
            l1_offset = first << geo.cluster_bits
            await drv.image_file.ensure_size(al.end * geo.cluster_size)
            await drv.image_file.write(l1_offset, struct.pack(f">{len(l1)}Q", *l1))
        await _add_references(drv, l1)
        await _update_copied(drv)
        await drv._flush_locked()
        entry = SnapshotEntry(
            l1_offset, len(l1), new_id(entries), stored_name(name), date_sec, date_nsec,
            vm_clock_nsec, 0,
            _EXTRA.pack(0, drv.header.size, NO_ICOUNT))
        await _write_table(drv, [*entries, entry])
        await drv._flush_locked()
        await drv._check_metadata_layout()
        return entry


async def delete_snapshot(drv: Qcow2Driver, snap_id: str | None,
                          name: str | None) -> SnapshotEntry:
    """Remove a snapshot and free what only it used.

    Raises:
        BlockIOError: no such snapshot (ENOENT), or an I/O error.
    """
    async with drv.lock:
        drv.corruption.check_usable()
        await drv._flush_locked()
        entries = await read_entries(drv)
        index = find(entries, snap_id, name)
        if index is None:
            raise BlockIOError(errno.ENOENT, "Can't find the snapshot")
        entry = entries.pop(index)
        refs = await _snapshot_references(drv, entry)
        await _write_table(drv, entries)
        drv.allocator.free_later(refs)
        await drv._flush_locked()
        await _update_copied(drv)
        await drv._flush_locked()
        await drv._check_metadata_layout()
        return entry


async def list_snapshots(drv: Qcow2Driver) -> list[SnapshotEntry]:
    async with drv.lock:
        return await read_entries(drv)


__all__ = ["MAX_NAME_BYTES", "SnapshotEntry", "create_snapshot", "delete_snapshot",
           "encode_table", "find", "list_snapshots", "new_id", "parse_entries", "stored_name"]
